-- Completion statements add each job's cost to its tenant's spend. With one row per tenant and
-- day, concurrent statements (every batch names the same few tenants) queued on that row's lock
-- until each committed, which serialized completions. Each database session now adds to a row of
-- its own (`shard` = its backend pid, which no other live session has), and a budget reads the
-- sum of the day's rows. SQLite has one writer, so its table keeps one row per tenant and day.
ALTER TABLE tenant_spend ADD COLUMN shard integer NOT NULL DEFAULT 0;
ALTER TABLE tenant_spend DROP CONSTRAINT tenant_spend_pkey;
ALTER TABLE tenant_spend ADD PRIMARY KEY (tenant, day, shard);
