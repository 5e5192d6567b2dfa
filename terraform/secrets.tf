# Secrets handed to the tasks through ECS `secrets` (never as plain environment variables).
# Sluice reads whole URLs, so the database and Redis secrets hold the full connection URL.

resource "random_password" "db" {
  length  = 40
  special = false
}

resource "random_password" "redis_auth" {
  length  = 64
  special = false
}

resource "aws_secretsmanager_secret" "database_url" {
  #checkov:skip=CKV2_AWS_57:The secret holds a full connection URL built from the RDS password; rotating it needs a custom rotation Lambda that rewrites the URL, which is out of scope here (rotate by tainting random_password.db and re-applying).
  name                    = "${var.name}/database-url"
  description             = "Sluice: PostgreSQL URL (SLUICE_DATABASE__URL)"
  kms_key_id              = aws_kms_key.sluice.arn
  recovery_window_in_days = 7
}

resource "aws_secretsmanager_secret_version" "database_url" {
  secret_id     = aws_secretsmanager_secret.database_url.id
  secret_string = "postgres://sluice:${random_password.db.result}@${aws_db_instance.postgres.address}:${aws_db_instance.postgres.port}/sluice?sslmode=require"
}

resource "aws_secretsmanager_secret" "redis_auth" {
  #checkov:skip=CKV2_AWS_57:ElastiCache AUTH token rotation (ROTATE then SET) is an operator procedure with a custom Lambda; out of scope here.
  name                    = "${var.name}/redis-auth"
  description             = "Sluice: ElastiCache AUTH token"
  kms_key_id              = aws_kms_key.sluice.arn
  recovery_window_in_days = 7
}

resource "aws_secretsmanager_secret_version" "redis_auth" {
  secret_id     = aws_secretsmanager_secret.redis_auth.id
  secret_string = random_password.redis_auth.result
}

resource "aws_secretsmanager_secret" "redis_url" {
  #checkov:skip=CKV2_AWS_57:Derived from the Redis AUTH token secret; rotated with it.
  name                    = "${var.name}/redis-url"
  description             = "Sluice: Redis URL with the AUTH token (SLUICE_REDIS__URL)"
  kms_key_id              = aws_kms_key.sluice.arn
  recovery_window_in_days = 7
}

resource "aws_secretsmanager_secret_version" "redis_url" {
  secret_id     = aws_secretsmanager_secret.redis_url.id
  secret_string = "rediss://:${random_password.redis_auth.result}@${aws_elasticache_replication_group.redis.primary_endpoint_address}:6379"
}

resource "aws_secretsmanager_secret" "provider_keys" {
  #checkov:skip=CKV2_AWS_57:Provider API keys are issued by the providers (OpenAI, Anthropic, Google); AWS cannot rotate them.
  name                    = "${var.name}/provider-keys"
  description             = "Sluice: provider API keys, a JSON object keyed by environment variable name"
  kms_key_id              = aws_kms_key.sluice.arn
  recovery_window_in_days = 7
}

resource "aws_secretsmanager_secret_version" "provider_keys" {
  count         = length(var.provider_key_names) > 0 ? 1 : 0
  secret_id     = aws_secretsmanager_secret.provider_keys.id
  secret_string = jsonencode(var.provider_api_keys)
}

locals {
  secret_arns = [
    aws_secretsmanager_secret.database_url.arn,
    aws_secretsmanager_secret.redis_url.arn,
    aws_secretsmanager_secret.provider_keys.arn,
  ]
}
