# ECS Fargate: the API service behind the load balancer and the worker service, one image.

resource "aws_cloudwatch_log_group" "api" {
  name              = "/ecs/${var.name}/api"
  retention_in_days = var.log_retention_days
  kms_key_id        = aws_kms_key.sluice.arn
}

resource "aws_cloudwatch_log_group" "worker" {
  name              = "/ecs/${var.name}/worker"
  retention_in_days = var.log_retention_days
  kms_key_id        = aws_kms_key.sluice.arn
}

resource "aws_cloudwatch_log_group" "exec" {
  name              = "/ecs/${var.name}/exec"
  retention_in_days = var.log_retention_days
  kms_key_id        = aws_kms_key.sluice.arn
}

resource "aws_ecs_cluster" "sluice" {
  name = var.name

  setting {
    name  = "containerInsights"
    value = "enabled"
  }

  configuration {
    execute_command_configuration {
      kms_key_id = aws_kms_key.sluice.arn
      logging    = "OVERRIDE"

      log_configuration {
        cloud_watch_encryption_enabled = true
        cloud_watch_log_group_name     = aws_cloudwatch_log_group.exec.name
      }
    }
  }
}

locals {
  # Configuration shared by both roles; the image's /app/sluice.toml holds pools and routes.
  sluice_environment = [
    { name = "SLUICE_CONFIG", value = "/app/sluice.toml" },
    { name = "SLUICE_LISTEN", value = "0.0.0.0:8080" },
    { name = "SLUICE_QUEUE__BACKEND", value = "sqs" },
    { name = "SLUICE_QUEUE__SQS__PREFIX", value = var.name },
    { name = "SLUICE_QUEUE__SQS__REGION", value = var.region },
    { name = "SLUICE_QUEUE__SQS__VISIBILITY_TIMEOUT_SECS", value = tostring(var.job_timeout_secs) },
    { name = "SLUICE_QUEUE__SQS__MAX_RECEIVE_COUNT", value = tostring(var.max_receive_count) },
    { name = "SLUICE_QUEUE__SQS__WAIT_TIME_SECS", value = "20" },
  ]

  sluice_secrets = concat(
    [
      { name = "SLUICE_DATABASE__URL", valueFrom = aws_secretsmanager_secret.database_url.arn },
      { name = "SLUICE_REDIS__URL", valueFrom = aws_secretsmanager_secret.redis_url.arn },
    ],
    [for key in var.provider_key_names : {
      name      = key
      valueFrom = "${aws_secretsmanager_secret.provider_keys.arn}:${key}::"
    }],
  )

  container_common = {
    image                  = var.image
    essential              = true
    readonlyRootFilesystem = true
    privileged             = false
    user                   = "10001:10001"
    environment            = local.sluice_environment
    secrets                = local.sluice_secrets
  }
}

resource "aws_ecs_task_definition" "api" {
  family                   = "${var.name}-api"
  requires_compatibilities = ["FARGATE"]
  network_mode             = "awsvpc"
  cpu                      = var.api_cpu
  memory                   = var.api_memory
  execution_role_arn       = aws_iam_role.execution.arn
  task_role_arn            = aws_iam_role.task.arn

  container_definitions = jsonencode([merge(local.container_common, {
    name         = "api"
    command      = ["serve"]
    portMappings = [{ containerPort = 8080, protocol = "tcp" }]
    healthCheck = {
      command     = ["CMD", "curl", "-fsS", "http://127.0.0.1:8080/healthz"]
      interval    = 15
      timeout     = 5
      retries     = 3
      startPeriod = 30
    }
    logConfiguration = {
      logDriver = "awslogs"
      options = {
        awslogs-group         = aws_cloudwatch_log_group.api.name
        awslogs-region        = var.region
        awslogs-stream-prefix = "api"
      }
    }
  })])
}

resource "aws_ecs_task_definition" "worker" {
  family                   = "${var.name}-worker"
  requires_compatibilities = ["FARGATE"]
  network_mode             = "awsvpc"
  cpu                      = var.worker_cpu
  memory                   = var.worker_memory
  execution_role_arn       = aws_iam_role.execution.arn
  task_role_arn            = aws_iam_role.task.arn

  container_definitions = jsonencode([merge(local.container_common, {
    name        = "worker"
    command     = ["worker"]
    stopTimeout = 60 # [worker] shutdown_grace_secs (30) plus a margin; 120 is Fargate's maximum
    logConfiguration = {
      logDriver = "awslogs"
      options = {
        awslogs-group         = aws_cloudwatch_log_group.worker.name
        awslogs-region        = var.region
        awslogs-stream-prefix = "worker"
      }
    }
  })])
}

resource "aws_ecs_service" "api" {
  name                              = "${var.name}-api"
  cluster                           = aws_ecs_cluster.sluice.id
  task_definition                   = aws_ecs_task_definition.api.arn
  desired_count                     = var.api_desired_count
  launch_type                       = "FARGATE"
  platform_version                  = "LATEST"
  health_check_grace_period_seconds = 60
  enable_execute_command            = true

  network_configuration {
    subnets          = var.private_subnet_ids
    security_groups  = [aws_security_group.api.id]
    assign_public_ip = false
  }

  load_balancer {
    target_group_arn = aws_lb_target_group.api.arn
    container_name   = "api"
    container_port   = 8080
  }

  deployment_circuit_breaker {
    enable   = true
    rollback = true
  }

  depends_on = [aws_lb_listener.https]
}

resource "aws_ecs_service" "worker" {
  name                   = "${var.name}-worker"
  cluster                = aws_ecs_cluster.sluice.id
  task_definition        = aws_ecs_task_definition.worker.arn
  desired_count          = var.worker_min_count
  launch_type            = "FARGATE"
  platform_version       = "LATEST"
  enable_execute_command = true

  network_configuration {
    subnets          = var.private_subnet_ids
    security_groups  = [aws_security_group.worker.id]
    assign_public_ip = false
  }

  deployment_circuit_breaker {
    enable   = true
    rollback = true
  }

  # The autoscaler owns the count after the first apply.
  lifecycle {
    ignore_changes = [desired_count]
  }
}
