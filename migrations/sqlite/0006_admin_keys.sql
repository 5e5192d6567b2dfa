-- Admin keys reach the operator API (/admin/v1) and nothing else; tenant keys never reach it.
ALTER TABLE api_keys ADD COLUMN role TEXT NOT NULL DEFAULT 'tenant' CHECK (role IN ('tenant', 'admin'));
