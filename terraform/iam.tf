# Roles of the ECS tasks. The execution role (used by ECS to start a task) may read exactly the
# three Sluice secrets and decrypt them; the task role (used by Sluice itself) may use exactly the
# lane queues. No role has wildcard resources.

data "aws_iam_policy_document" "ecs_tasks_assume" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["ecs-tasks.amazonaws.com"]
    }
    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [local.account_id]
    }
  }
}

resource "aws_iam_role" "execution" {
  name               = "${var.name}-ecs-execution"
  assume_role_policy = data.aws_iam_policy_document.ecs_tasks_assume.json
}

resource "aws_iam_role_policy_attachment" "execution_managed" {
  role       = aws_iam_role.execution.name
  policy_arn = "arn:${local.partition}:iam::aws:policy/service-role/AmazonECSTaskExecutionRolePolicy"
}

data "aws_iam_policy_document" "execution_secrets" {
  statement {
    sid       = "ReadSluiceSecrets"
    actions   = ["secretsmanager:GetSecretValue"]
    resources = local.secret_arns
  }
  statement {
    sid       = "DecryptSluiceSecrets"
    actions   = ["kms:Decrypt"]
    resources = [aws_kms_key.sluice.arn]
  }
}

resource "aws_iam_role_policy" "execution_secrets" {
  name   = "sluice-secrets"
  role   = aws_iam_role.execution.id
  policy = data.aws_iam_policy_document.execution_secrets.json
}

resource "aws_iam_role" "task" {
  name               = "${var.name}-task"
  assume_role_policy = data.aws_iam_policy_document.ecs_tasks_assume.json
}

data "aws_iam_policy_document" "task_sqs" {
  statement {
    sid = "UseLanes"
    actions = [
      "sqs:SendMessage",
      "sqs:ReceiveMessage",
      "sqs:DeleteMessage",
      "sqs:ChangeMessageVisibility",
      "sqs:GetQueueAttributes",
      "sqs:GetQueueUrl",
    ]
    resources = local.lane_queue_arns
  }
  statement {
    # Sluice declares its lanes on start (CreateQueue is a no-op for an existing queue) and
    # sets the same visibility timeout, retention and redrive policy Terraform did.
    sid       = "DeclareLanes"
    actions   = ["sqs:CreateQueue", "sqs:SetQueueAttributes"]
    resources = local.lane_queue_arns
  }
  statement {
    sid       = "EncryptedLanes"
    actions   = ["kms:Decrypt", "kms:GenerateDataKey"]
    resources = [aws_kms_key.sluice.arn]
  }
}

resource "aws_iam_role_policy" "task_sqs" {
  name   = "sluice-lanes"
  role   = aws_iam_role.task.id
  policy = data.aws_iam_policy_document.task_sqs.json
}
