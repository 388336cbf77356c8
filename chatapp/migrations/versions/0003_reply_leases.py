"""reply leases, the stopped status, one active reply per conversation, idempotency keys

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28 06:20:00

"""
from datetime import datetime, timezone

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None

ACTIVE = "status IN ('pending', 'streaming')"


def upgrade():
    # Before the unique index: a conversation that (through the old read-then-insert
    # race) has two replies in progress keeps its newest one running.
    op.execute(
        "UPDATE messages SET status = 'failed', error = 'interrupted; regenerate to retry' "
        f"WHERE {ACTIVE} AND id NOT IN "
        f"(SELECT max(id) FROM messages WHERE {ACTIVE} GROUP BY conversation_id)"
    )
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.drop_index('ix_messages_status_updated')
        batch_op.add_column(sa.Column('lease_owner', sa.String(length=80), nullable=True))
        batch_op.add_column(sa.Column('lease_expires_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('runs', sa.Integer(), nullable=False, server_default='0'))
        batch_op.add_column(sa.Column('idempotency_key', sa.String(length=100), nullable=True))
        batch_op.drop_constraint(op.f('ck_messages_message_status'), type_='check')
        batch_op.create_check_constraint(
            op.f('ck_messages_message_status'),
            "status IN ('pending', 'streaming', 'complete', 'failed', 'stopped')",
        )
        batch_op.create_index(
            'uq_messages_one_active_reply', ['conversation_id'], unique=True,
            sqlite_where=sa.text(ACTIVE), postgresql_where=sa.text(ACTIVE),
        )
        batch_op.create_index(
            'uq_messages_idempotency_key', ['conversation_id', 'idempotency_key'], unique=True
        )
    # Replies in progress when the server was upgraded belong to no process now: handed
    # over, so the first sweep runs each again as a new attempt (text restarted, streams
    # reset) instead of appending a new answer to the old partial text.
    messages = sa.table(
        'messages', sa.column('status', sa.String), sa.column('lease_owner', sa.String),
        sa.column('lease_expires_at', sa.DateTime(timezone=True)),
    )
    op.execute(
        messages.update()
        .where(messages.c.status.in_(['pending', 'streaming']))
        .values(lease_owner='released', lease_expires_at=datetime(2000, 1, 1, tzinfo=timezone.utc))
    )


def downgrade():
    op.execute("UPDATE messages SET status = 'failed' WHERE status = 'stopped'")
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.drop_index('uq_messages_idempotency_key')
        batch_op.drop_index('uq_messages_one_active_reply')
        batch_op.drop_constraint(op.f('ck_messages_message_status'), type_='check')
        batch_op.create_check_constraint(
            op.f('ck_messages_message_status'),
            "status IN ('pending', 'streaming', 'complete', 'failed')",
        )
        batch_op.drop_column('idempotency_key')
        batch_op.drop_column('runs')
        batch_op.drop_column('lease_expires_at')
        batch_op.drop_column('lease_owner')
        batch_op.create_index('ix_messages_status_updated', ['status', 'updated_at'], unique=False)
