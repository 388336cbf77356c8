"""per-conversation model and system prompt, title source, the model of each reply

Revision ID: 0004b
Revises: 0004t
Create Date: 2026-11-28 11:50:00

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '0004b'
down_revision = '0004t'
branch_labels = None
depends_on = None


def upgrade():
    # Nullable columns (None: the server's defaults) and a server default for the title's source.
    with op.batch_alter_table('conversations', schema=None) as batch_op:
        batch_op.add_column(
            sa.Column('title_source', sa.String(length=16), nullable=False, server_default='default')
        )
        batch_op.add_column(sa.Column('model', sa.String(length=200), nullable=True))
        batch_op.add_column(sa.Column('system_prompt', sa.Text(), nullable=True))
    # A title someone gave (at creation or by renaming) must never be replaced by a generated
    # one: only chats still called "New chat" are left for the title job.
    op.execute("UPDATE conversations SET title_source = 'user' WHERE title <> 'New chat'")
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.add_column(sa.Column('model', sa.String(length=200), nullable=True))


def downgrade():
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.drop_column('model')
    with op.batch_alter_table('conversations', schema=None) as batch_op:
        batch_op.drop_column('system_prompt')
        batch_op.drop_column('model')
        batch_op.drop_column('title_source')
