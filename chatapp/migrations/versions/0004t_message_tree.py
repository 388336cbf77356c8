"""messages form a tree: parent_id, and each conversation's current branch

Revision ID: 0004t
Revises: 0004a
Create Date: 2026-11-28 12:00:00

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '0004t'
down_revision = '0004a'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.add_column(sa.Column('parent_id', sa.Integer(), nullable=True))
        batch_op.create_foreign_key(
            batch_op.f('fk_messages_parent_id_messages'), 'messages', ['parent_id'], ['id'], ondelete='CASCADE'
        )
        batch_op.create_index('ix_messages_parent_id', ['parent_id', 'conversation_id', 'id'], unique=False)
    with op.batch_alter_table('conversations', schema=None) as batch_op:
        batch_op.add_column(sa.Column('current_leaf_id', sa.Integer(), nullable=True))
        batch_op.create_foreign_key(
            'fk_conversations_current_leaf_id_messages', 'messages', ['current_leaf_id'], ['id'],
            ondelete='SET NULL',
        )
    # Every conversation so far is one branch, unchanged: each message follows the one
    # before it (by id, the order it was shown in), and the branch ends at the last one.
    op.execute(
        "UPDATE messages SET parent_id = (SELECT max(p.id) FROM messages p "
        "WHERE p.conversation_id = messages.conversation_id AND p.id < messages.id)"
    )
    op.execute(
        "UPDATE conversations SET current_leaf_id = (SELECT max(m.id) FROM messages m "
        "WHERE m.conversation_id = conversations.id)"
    )


def downgrade():
    # The current branch is what a linear conversation keeps; other branches go, so that
    # the conversation reads as it did before the downgrade (a downgrade loses versions).
    op.execute(
        "DELETE FROM messages WHERE id NOT IN ("
        "WITH RECURSIVE branch(id, parent_id) AS ("
        "SELECT m.id, m.parent_id FROM messages m JOIN conversations c ON m.id = c.current_leaf_id "
        "UNION ALL SELECT m.id, m.parent_id FROM messages m JOIN branch b ON m.id = b.parent_id) "
        "SELECT id FROM branch)"
    )
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.drop_index('ix_messages_parent_id')
        batch_op.drop_constraint(batch_op.f('fk_messages_parent_id_messages'), type_='foreignkey')
        batch_op.drop_column('parent_id')
    with op.batch_alter_table('conversations', schema=None) as batch_op:
        batch_op.drop_constraint('fk_conversations_current_leaf_id_messages', type_='foreignkey')
        batch_op.drop_column('current_leaf_id')

