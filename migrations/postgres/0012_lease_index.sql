-- The reaper's index had `state = 'running'` as its predicate, so the planner could answer any
-- `state = 'running'` condition from it. Statistics taken when few jobs ran (a new install, the
-- start of a burst) made it prefer that index over the primary key for the worker's batched
-- completions and heartbeats: each statement then read every running job (thousands of rows and
-- their dead versions) to update a few dozen. Every transition out of `running` clears
-- `lease_until`, so an index over the leases that are set serves the reaper just as well and
-- offers nothing to a statement that names its jobs by id.
DROP INDEX jobs_expired_leases;
UPDATE jobs SET lease_until = NULL WHERE state <> 'running' AND lease_until IS NOT NULL;
CREATE INDEX jobs_leases ON jobs (lease_until) WHERE lease_until IS NOT NULL;
