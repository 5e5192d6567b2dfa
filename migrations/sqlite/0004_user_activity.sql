-- Subscribers to all of a user's jobs read that user's recently active jobs.
CREATE INDEX jobs_user_activity ON jobs (tenant, user_id, updated_at);
