from django.db import models


class Note(models.Model):
    """A short text note; its read count lives in Redis (see views)."""

    title = models.CharField(max_length=200)
    body = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ("-created_at", "-id")
