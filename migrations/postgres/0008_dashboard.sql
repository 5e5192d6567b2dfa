-- The dashboard reads the last minutes of finished jobs and of job events every 2 s while
-- it is open: without these it would scan both tables each time.
CREATE INDEX jobs_finished ON jobs (finished_at) WHERE finished_at IS NOT NULL;
CREATE INDEX job_events_at ON job_events (at);
