# Bakes phoenix-agent into an image. Paste the variables, the file and shell provisioners into
# your own build; the source below only stands in for yours.
#
# Run from the repository root (the default paths below are relative to it), after
# `cargo build --release -p phoenix-agent && scripts/build-deb.sh agent`:
#
#   packer init image-snippets/packer
#   packer build -var collector_url=https://collector:7070 -var pipeline_token=... \
#                -var agent_token=... -var agent_deb=target/debian/phoenix-agent_0.1.0_amd64.deb \
#                image-snippets/packer
#
# The image id the baseline is registered under must be the one the instances later report.
# The AMI id does not exist until after the build, so the build names the image itself
# (image_id below), tags the AMI with it and writes it into agent.toml, which the agent's
# identity prefers over what the metadata service says.

packer {
  # 1.7 brought required_plugins; since 1.10 the amazon builder is a plugin, not built in.
  required_version = ">= 1.7.0"
  required_plugins {
    amazon = {
      version = ">= 1.2.0"
      source  = "github.com/hashicorp/amazon"
    }
  }
}

variable "collector_url" {
  type        = string
  description = "phoenix-collector base URL; bake registers the baseline there, the agent reports there."
}

variable "pipeline_token" {
  type        = string
  description = "The collector's --pipeline-token: allowed to register baselines, nothing else."
  sensitive   = true
}

variable "agent_token" {
  type        = string
  description = "The collector's --agent-token the instances report with (written 0600)."
  sensitive   = true
}

variable "agent_deb" {
  type        = string
  description = "The phoenix-agent .deb from scripts/build-deb.sh (target/debian/phoenix-agent_VERSION_ARCH.deb)."
}

variable "snippets_dir" {
  type        = string
  default     = "image-snippets"
  description = "This directory: install.sh, agent.toml.example, systemd/phoenix-agent.service."
}

variable "agent_config" {
  type        = string
  default     = "image-snippets/agent.toml.example"
  description = "The agent.toml to bake in; its drift_path must match the bake step's paths."
}

variable "image_name" {
  type    = string
  default = "phoenix-web"
}

variable "region" {
  type    = string
  default = "eu-west-1"
}

variable "source_ami" {
  type        = string
  default     = "ami-00000000000000000"
  description = "The stock image to start from (Debian 12 or Ubuntu 22.04+)."
}

locals {
  # One id for the AMI's name, its tag, the agent config and the registered baseline.
  image_id = "${var.image_name}-${formatdate("YYYYMMDDhhmmss", timestamp())}"
}

source "amazon-ebs" "base" {
  region        = var.region
  source_ami    = var.source_ami
  instance_type = "t3.small"
  ssh_username  = "admin"
  ami_name      = local.image_id
  tags = {
    phoenix_image_id = local.image_id
  }
}

build {
  sources = ["source.amazon-ebs.base"]

  provisioner "file" {
    source      = var.agent_deb
    destination = "/tmp/phoenix-agent.deb"
  }

  provisioner "file" {
    source      = var.agent_config
    destination = "/tmp/phoenix-agent.toml"
  }

  provisioner "file" {
    source      = "${var.snippets_dir}/install.sh"
    destination = "/tmp/phoenix-install.sh"
  }

  # Everything the application needs is installed before this provisioner: bake must be the
  # last thing that touches the watched paths, or the image starts out drifted.
  provisioner "shell" {
    environment_vars = ["PHOENIX_TOKEN=${var.agent_token}"]
    execute_command  = "sudo -E sh -eu '{{ .Path }}'"
    inline = [
      "printf '\\nimage_id = \"%s\"\\n' '${local.image_id}' >> /tmp/phoenix-agent.toml",
      "sh /tmp/phoenix-install.sh --deb /tmp/phoenix-agent.deb --config /tmp/phoenix-agent.toml --enable",
      "rm -f /tmp/phoenix-agent.deb /tmp/phoenix-agent.toml /tmp/phoenix-install.sh",
      "/usr/bin/phoenix-agent --version",
      "systemd-analyze verify /lib/systemd/system/phoenix-agent.service",
      # State of the build instance must not leak into the instances.
      "rm -rf /var/lib/phoenix-agent /var/lib/private/phoenix-agent",
      "cloud-init clean --logs --seed",
      "truncate -s 0 /etc/machine-id",
      "rm -f /var/lib/dbus/machine-id",
      "rm -f /etc/ssh/ssh_host_*",
      "phoenix-agent bake --drift-path /etc --drift-path /opt/app/config --image-id ${local.image_id} --out /usr/share/phoenix-agent/baseline.json --register ${var.collector_url} --token ${var.pipeline_token}",
    ]
  }
}
