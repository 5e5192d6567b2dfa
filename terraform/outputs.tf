output "api_url" {
  description = "HTTPS address of the API load balancer (point your DNS name for certificate_arn at alb_dns_name)."
  value       = "https://${aws_lb.api.dns_name}"
}

output "alb_dns_name" {
  description = "DNS name of the API load balancer, for a CNAME or alias record."
  value       = aws_lb.api.dns_name
}

output "lane_queue_urls" {
  description = "SQS queue URL of each lane (priority, standard, batch, retry, dead)."
  value       = merge({ for lane, q in aws_sqs_queue.lane : lane => q.url }, { dead = aws_sqs_queue.dead.url })
}

output "dead_queue_arn" {
  description = "ARN of the dead lane, the redrive target of every work lane."
  value       = aws_sqs_queue.dead.arn
}

output "database_endpoint" {
  description = "Address and port of the RDS PostgreSQL instance (private)."
  value       = aws_db_instance.postgres.endpoint
}

output "redis_primary_endpoint" {
  description = "Primary endpoint address of the ElastiCache Redis replication group (TLS, AUTH)."
  value       = aws_elasticache_replication_group.redis.primary_endpoint_address
}

output "secret_arns" {
  description = "Secrets Manager ARNs: database URL, Redis URL, Redis AUTH token and provider keys."
  value = {
    database_url  = aws_secretsmanager_secret.database_url.arn
    redis_url     = aws_secretsmanager_secret.redis_url.arn
    redis_auth    = aws_secretsmanager_secret.redis_auth.arn
    provider_keys = aws_secretsmanager_secret.provider_keys.arn
  }
}

output "ecs_cluster_name" {
  description = "Name of the ECS cluster running the api and worker services."
  value       = aws_ecs_cluster.sluice.name
}

output "api_service_name" {
  description = "Name of the ECS service of the API."
  value       = aws_ecs_service.api.name
}

output "worker_service_name" {
  description = "Name of the ECS service of the workers (scaled on lane depth)."
  value       = aws_ecs_service.worker.name
}

output "kms_key_arn" {
  description = "ARN of the KMS key encrypting the lanes, secrets, database, Redis and logs."
  value       = aws_kms_key.sluice.arn
}

output "log_groups" {
  description = "CloudWatch log groups of the api and worker tasks."
  value       = { api = aws_cloudwatch_log_group.api.name, worker = aws_cloudwatch_log_group.worker.name }
}
