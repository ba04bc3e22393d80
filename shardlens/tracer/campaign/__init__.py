"""Campaigns: a YAML file of experiments over prompt data, run as resumable work units.

schema: reading and validating the campaign file (its schema is in the README); data: the
prompt rows and their token ids; units: running the work units, resumably; report:
summary.json, summary.md and plots.
"""

from shardlens.tracer.campaign.schema import CampaignError, load_campaign
from shardlens.tracer.campaign.units import run_campaign

__all__ = ["CampaignError", "load_campaign", "run_campaign"]
