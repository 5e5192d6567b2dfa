# One customer-managed key for everything Sluice stores: SQS lanes, secrets, RDS (storage and
# Performance Insights), ElastiCache, CloudWatch Logs and ECS Exec sessions.
resource "aws_kms_key" "sluice" {
  description             = "${var.name}: SQS, Secrets Manager, RDS, ElastiCache, CloudWatch Logs"
  enable_key_rotation     = true
  deletion_window_in_days = 30

  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [
      {
        # Key administration and use stay with IAM policies of this account (the task roles
        # below are granted only Decrypt/GenerateDataKey on this key).
        Sid       = "AccountAdministers"
        Effect    = "Allow"
        Principal = { AWS = "arn:${local.partition}:iam::${local.account_id}:root" }
        Action    = "kms:*"
        Resource  = "*"
      },
      {
        Sid       = "CloudWatchLogsEncrypt"
        Effect    = "Allow"
        Principal = { Service = "logs.${var.region}.amazonaws.com" }
        Action = [
          "kms:Encrypt",
          "kms:Decrypt",
          "kms:ReEncrypt*",
          "kms:GenerateDataKey*",
          "kms:Describe*",
        ]
        Resource = "*"
        Condition = {
          ArnLike = {
            "kms:EncryptionContext:aws:logs:arn" = "arn:${local.partition}:logs:${var.region}:${local.account_id}:log-group:/ecs/${var.name}/*"
          }
        }
      },
    ]
  })
}

resource "aws_kms_alias" "sluice" {
  name          = "alias/${var.name}"
  target_key_id = aws_kms_key.sluice.key_id
}
