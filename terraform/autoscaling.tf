# Workers scale on lane depth: the messages visible in the priority, standard, batch and retry
# lanes together. Above worker_scale_out_depth for 2 minutes: +2 tasks; below
# worker_scale_in_depth for 15 minutes: -1 task; between worker_min_count and worker_max_count.

resource "aws_appautoscaling_target" "worker" {
  service_namespace  = "ecs"
  resource_id        = "service/${aws_ecs_cluster.sluice.name}/${aws_ecs_service.worker.name}"
  scalable_dimension = "ecs:service:DesiredCount"
  min_capacity       = var.worker_min_count
  max_capacity       = var.worker_max_count
}

resource "aws_appautoscaling_policy" "worker_out" {
  name               = "${var.name}-worker-scale-out"
  policy_type        = "StepScaling"
  service_namespace  = aws_appautoscaling_target.worker.service_namespace
  resource_id        = aws_appautoscaling_target.worker.resource_id
  scalable_dimension = aws_appautoscaling_target.worker.scalable_dimension

  step_scaling_policy_configuration {
    adjustment_type         = "ChangeInCapacity"
    cooldown                = var.scale_cooldown_secs
    metric_aggregation_type = "Maximum"

    step_adjustment {
      metric_interval_lower_bound = 0
      scaling_adjustment          = 2
    }
  }
}

resource "aws_appautoscaling_policy" "worker_in" {
  name               = "${var.name}-worker-scale-in"
  policy_type        = "StepScaling"
  service_namespace  = aws_appautoscaling_target.worker.service_namespace
  resource_id        = aws_appautoscaling_target.worker.resource_id
  scalable_dimension = aws_appautoscaling_target.worker.scalable_dimension

  step_scaling_policy_configuration {
    adjustment_type         = "ChangeInCapacity"
    cooldown                = var.scale_cooldown_secs
    metric_aggregation_type = "Maximum"

    step_adjustment {
      metric_interval_upper_bound = 0
      scaling_adjustment          = -1
    }
  }
}

locals {
  # m_priority + m_standard + ... : the depth of the lanes workers consume.
  lane_depth_expression = join(" + ", [for lane in local.work_lanes : "m_${lane}"])
}

resource "aws_cloudwatch_metric_alarm" "lanes_deep" {
  alarm_name          = "${var.name}-lanes-deep"
  alarm_description   = "Sluice work lanes hold more than ${var.worker_scale_out_depth} visible messages: add workers."
  comparison_operator = "GreaterThanThreshold"
  evaluation_periods  = 2
  threshold           = var.worker_scale_out_depth
  alarm_actions       = [aws_appautoscaling_policy.worker_out.arn]

  metric_query {
    id          = "depth"
    expression  = local.lane_depth_expression
    label       = "Visible messages in the work lanes"
    return_data = true
  }

  dynamic "metric_query" {
    for_each = aws_sqs_queue.lane
    content {
      id = "m_${metric_query.key}"
      metric {
        namespace   = "AWS/SQS"
        metric_name = "ApproximateNumberOfMessagesVisible"
        period      = 60
        stat        = "Maximum"
        dimensions  = { QueueName = metric_query.value.name }
      }
    }
  }
}

resource "aws_cloudwatch_metric_alarm" "lanes_shallow" {
  alarm_name          = "${var.name}-lanes-shallow"
  alarm_description   = "Sluice work lanes hold fewer than ${var.worker_scale_in_depth} visible messages: remove a worker."
  comparison_operator = "LessThanThreshold"
  evaluation_periods  = 15
  threshold           = var.worker_scale_in_depth
  alarm_actions       = [aws_appautoscaling_policy.worker_in.arn]

  metric_query {
    id          = "depth"
    expression  = local.lane_depth_expression
    label       = "Visible messages in the work lanes"
    return_data = true
  }

  dynamic "metric_query" {
    for_each = aws_sqs_queue.lane
    content {
      id = "m_${metric_query.key}"
      metric {
        namespace   = "AWS/SQS"
        metric_name = "ApproximateNumberOfMessagesVisible"
        period      = 60
        stat        = "Maximum"
        dimensions  = { QueueName = metric_query.value.name }
      }
    }
  }
}
