-- Schema of the URL shortener. Idempotent: safe to apply any number of times.
CREATE TABLE IF NOT EXISTS links (
    code        VARCHAR(16)  PRIMARY KEY,
    url         TEXT         NOT NULL CHECK (length(url) <= 2048),
    created_at  TIMESTAMPTZ  NOT NULL DEFAULT now()
);

CREATE INDEX IF NOT EXISTS links_created_at_idx ON links (created_at);
