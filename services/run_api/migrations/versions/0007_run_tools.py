"""The tools a run needs, so a claim hands a run only to a worker that has them.

`runs.required_tools` holds the distinct tools of the run's workflow version (for `runtime.tool`,
the tool its input names), set by StartRun. Nullable: runs from before are silent about it and any
worker may take them, as before.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

from alembic import op

revision = "0007"
down_revision = "0006"


def upgrade() -> None:
    op.execute("ALTER TABLE runs ADD COLUMN required_tools text[]")


def downgrade() -> None:
    op.execute("ALTER TABLE runs DROP COLUMN required_tools")
