variable "name" {
  description = "Name of this deployment: prefixes every resource and the SQS lane queues (<name>-priority, ...). 1 to 40 characters of letters, digits and '-'."
  type        = string
  default     = "sluice"

  validation {
    condition     = can(regex("^[A-Za-z0-9-]{1,40}$", var.name))
    error_message = "name must be 1 to 40 letters, digits or '-'."
  }
}

variable "region" {
  description = "AWS region to deploy into."
  type        = string
  default     = "us-east-1"
}

variable "tags" {
  description = "Extra tags applied to every resource."
  type        = map(string)
  default     = {}
}

variable "vpc_id" {
  description = "ID of the existing VPC to deploy into."
  type        = string
}

variable "private_subnet_ids" {
  description = "Private subnets (at least two, in different availability zones) for the ECS tasks, RDS and ElastiCache. They need a route to the internet (NAT) or VPC endpoints for SQS, Secrets Manager, ECR and CloudWatch Logs."
  type        = list(string)
}

variable "public_subnet_ids" {
  description = "Public subnets (at least two, in different availability zones) for the internet-facing load balancer."
  type        = list(string)
}

variable "alb_ingress_cidrs" {
  description = "CIDR blocks allowed to reach the load balancer's HTTPS listener."
  type        = list(string)
  default     = ["10.0.0.0/8"]
}

variable "certificate_arn" {
  description = "ARN of the ACM certificate for the load balancer's HTTPS listener."
  type        = string
}

variable "alb_access_logs_bucket" {
  description = "Name of an existing S3 bucket (with a policy allowing ELB log delivery) for the load balancer's access logs."
  type        = string
}

variable "waf_web_acl_arn" {
  description = "ARN of an existing WAFv2 web ACL (regional, with the AWS managed rule sets you require) to associate with the load balancer."
  type        = string
}

variable "image" {
  description = "Container image of Sluice, built from this repository's Dockerfile (ENTRYPOINT sluice). Bake the production sluice.toml (pools, routes, tiers) into it at /app/sluice.toml; addresses and secrets are passed as SLUICE_* variables by the task definitions."
  type        = string
}

variable "job_timeout_secs" {
  description = "Longest a job may run (the providers' timeout_secs plus margin). Used as the SQS lanes' visibility timeout and passed to Sluice as queue.sqs.visibility_timeout_secs, so a message is redelivered only after its worker is gone."
  type        = number
  default     = 300

  validation {
    condition     = var.job_timeout_secs >= 1 && var.job_timeout_secs <= 43200
    error_message = "job_timeout_secs must be between 1 and 43200 (SQS's limit)."
  }
}

variable "max_receive_count" {
  description = "Receives of one message before SQS's redrive policy moves it to the dead lane."
  type        = number
  default     = 3
}

variable "db_instance_class" {
  description = "RDS instance class of the PostgreSQL database."
  type        = string
  default     = "db.t4g.medium"
}

variable "db_allocated_storage_gb" {
  description = "Initial storage of the PostgreSQL database in GiB (storage autoscaling may grow it to 4x)."
  type        = number
  default     = 50
}

variable "db_engine_version" {
  description = "PostgreSQL major.minor version for RDS."
  type        = string
  default     = "16.4"
}

variable "db_multi_az" {
  description = "Run the database as a Multi-AZ deployment (a synchronous standby in another zone)."
  type        = bool
  default     = true
}

variable "db_backup_retention_days" {
  description = "Days of automated RDS backups (point-in-time recovery window)."
  type        = number
  default     = 14
}

variable "redis_node_type" {
  description = "ElastiCache node type for Redis."
  type        = string
  default     = "cache.t4g.small"
}

variable "redis_engine_version" {
  description = "Redis engine version for ElastiCache."
  type        = string
  default     = "7.1"
}

variable "api_cpu" {
  description = "Fargate CPU units of one API task (1024 = 1 vCPU)."
  type        = number
  default     = 512
}

variable "api_memory" {
  description = "Fargate memory of one API task in MiB."
  type        = number
  default     = 1024
}

variable "api_desired_count" {
  description = "Number of API tasks behind the load balancer."
  type        = number
  default     = 2
}

variable "worker_cpu" {
  description = "Fargate CPU units of one worker task (1024 = 1 vCPU)."
  type        = number
  default     = 1024
}

variable "worker_memory" {
  description = "Fargate memory of one worker task in MiB."
  type        = number
  default     = 2048
}

variable "worker_min_count" {
  description = "Fewest worker tasks the autoscaler keeps."
  type        = number
  default     = 2
}

variable "worker_max_count" {
  description = "Most worker tasks the autoscaler may run."
  type        = number
  default     = 20
}

variable "worker_scale_out_depth" {
  description = "Messages visible across the priority, standard, batch and retry lanes above which the workers scale out (by 2 tasks per step)."
  type        = number
  default     = 100
}

variable "worker_scale_in_depth" {
  description = "Messages visible across the work lanes below which the workers scale in (by 1 task per step)."
  type        = number
  default     = 10
}

variable "scale_cooldown_secs" {
  description = "Seconds between two scaling actions of the workers."
  type        = number
  default     = 300
}

variable "log_retention_days" {
  description = "Days CloudWatch keeps the tasks' logs (at least 365 for the checkov baseline)."
  type        = number
  default     = 365
}

variable "provider_api_keys" {
  description = "Provider API keys by environment variable name (e.g. { OPENAI_API_KEY = \"sk-...\" }), stored in one Secrets Manager secret and passed to the workers as those variables; the baked sluice.toml's endpoints name them with api_key_env. Leave empty to put the secret's value in place out of band."
  type        = map(string)
  default     = {}
  sensitive   = true
}

variable "provider_key_names" {
  description = "Names of the environment variables holding provider keys (the keys of provider_api_keys, listed here because a sensitive map cannot drive the task definitions)."
  type        = list(string)
  default     = []
}
