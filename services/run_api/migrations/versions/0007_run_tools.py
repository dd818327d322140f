"""The tools a run needs, so a claim hands a run only to a worker that has them.

`runs.required_tools` holds the distinct tools of the run's workflow version (for `runtime.tool`,
the tool its input names), set by StartRun, StartRuns and RebuildRun from the run.queued event.
Nullable: runs from before are silent about it and any worker may take them, as before (the claim
reads NULL as the empty set).

`runs_claim_tools_idx` orders the queue by tool set before claim order, so that a claim reads only
the tool sets its worker has (the distinct sets by a loose index scan, then a range of each): runs
that no live worker can take do not slow the claims of the others (store/queries.py runs_claim).
`runs_claim_idx` stays for the queue position ExplainRun counts.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

from alembic import op

revision = "0007"
down_revision = "0006"


def upgrade() -> None:
    op.execute("ALTER TABLE runs ADD COLUMN required_tools text[]")
    op.execute(
        """
        CREATE INDEX runs_claim_tools_idx
            ON runs (tenant_id, workspace_id, (COALESCE(required_tools, '{}')), next_attempt_at, run_id)
            WHERE status = 'QUEUED'
        """
    )


def downgrade() -> None:
    op.execute("DROP INDEX runs_claim_tools_idx")
    op.execute("ALTER TABLE runs DROP COLUMN required_tools")
