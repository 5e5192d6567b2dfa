# The lanes: <name>-priority, -standard, -batch, -retry and the dead lane. Sluice's SQS backend
# (queue.sqs) names its queues the same way and on start sets the visibility timeout, retention
# and redrive policy it is configured with; the task definitions pass it these same values
# (job_timeout_secs, max_receive_count) so Terraform and Sluice agree.

resource "aws_sqs_queue" "dead" {
  name                              = "${var.name}-dead"
  visibility_timeout_seconds        = var.job_timeout_secs
  message_retention_seconds         = local.message_retention_seconds
  receive_wait_time_seconds         = 20
  kms_master_key_id                 = aws_kms_key.sluice.arn
  kms_data_key_reuse_period_seconds = 300
}

resource "aws_sqs_queue" "lane" {
  for_each = toset(local.work_lanes)

  name                              = "${var.name}-${each.key}"
  visibility_timeout_seconds        = var.job_timeout_secs
  message_retention_seconds         = local.message_retention_seconds
  receive_wait_time_seconds         = 20
  max_message_size                  = 262144
  kms_master_key_id                 = aws_kms_key.sluice.arn
  kms_data_key_reuse_period_seconds = 300

  redrive_policy = jsonencode({
    deadLetterTargetArn = aws_sqs_queue.dead.arn
    maxReceiveCount     = var.max_receive_count
  })
}

# Only the lanes may send to the dead queue by redrive.
resource "aws_sqs_queue_redrive_allow_policy" "dead" {
  queue_url = aws_sqs_queue.dead.id

  redrive_allow_policy = jsonencode({
    redrivePermission = "byQueue"
    sourceQueueArns   = [for q in aws_sqs_queue.lane : q.arn]
  })
}

locals {
  lane_queue_arns = concat([for q in aws_sqs_queue.lane : q.arn], [aws_sqs_queue.dead.arn])
}
