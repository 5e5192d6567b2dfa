terraform {
  required_version = ">= 1.5"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.40, < 7"
    }
    random = {
      source  = "hashicorp/random"
      version = ">= 3.5, < 4"
    }
  }
}

provider "aws" {
  region = var.region

  default_tags {
    tags = merge(var.tags, { Application = "sluice", Deployment = var.name })
  }
}

data "aws_caller_identity" "current" {}
data "aws_partition" "current" {}

locals {
  account_id = data.aws_caller_identity.current.account_id
  partition  = data.aws_partition.current.partition

  # The lanes workers consume; `dead` is only inspected and replayed by operators.
  work_lanes = ["priority", "standard", "batch", "retry"]
  all_lanes  = concat(local.work_lanes, ["dead"])

  # Sluice sets each lane's retention itself (14 days): the same value here avoids drift.
  message_retention_seconds = 1209600
}
