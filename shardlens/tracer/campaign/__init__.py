"""Campaigns: a YAML file of experiments over prompt data, run as resumable work units.

schema: reading and validating the campaign file (its schema is in the README); data: the
prompt rows and their token ids; units: running the work units, resumably; report:
summary.json, summary.md and plots; verify: checking the cluster against one process;
status: a campaign's progress, read from its output folder.
"""

from shardlens.tracer.campaign.schema import CampaignError, load_campaign
from shardlens.tracer.campaign.status import CampaignStatus, status
from shardlens.tracer.campaign.units import run_campaign
from shardlens.tracer.campaign.verify import Verification, VerificationError, verify

__all__ = ["CampaignError", "CampaignStatus", "Verification", "VerificationError", "load_campaign", "run_campaign", "status", "verify"]
