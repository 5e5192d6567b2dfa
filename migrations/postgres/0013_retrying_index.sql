-- The reconciler looks for retrying jobs whose message may be gone, oldest change first.
CREATE INDEX jobs_retrying ON jobs (updated_at) WHERE state = 'retrying';
