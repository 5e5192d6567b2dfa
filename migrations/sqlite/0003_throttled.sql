-- 429s a job met. They are counted apart from `tries`, so throttling by a provider does not
-- use up the retry budget that real failures are held to.
ALTER TABLE jobs ADD COLUMN throttled INTEGER NOT NULL DEFAULT 0;
