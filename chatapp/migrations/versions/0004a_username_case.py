"""usernames unique regardless of case: a unique index on lower(username)

Revision ID: 0004a
Revises: 0003
Create Date: 2026-11-28 11:55:00.000000

"""
import logging

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '0004a'
down_revision = '0003'
branch_labels = None
depends_on = None

log = logging.getLogger("alembic.runtime.migration")


def _free_name(base: str, taken: set[str]) -> str:
    """``base`` with the shortest suffix "-2", "-3", ... that no user has in any case, cut to fit 40."""
    for number in range(2, 100_000):
        suffix = f"-{number}"
        candidate = base[: 40 - len(suffix)] + suffix
        if candidate.lower() not in taken:
            return candidate
    raise RuntimeError(f"no free name for {base!r}")


def upgrade():
    # Names that differ only by case may exist from before: the oldest account (lowest id)
    # keeps its name, each later one is renamed "<name>-2", "-3"... and logged, so that no
    # account or data is lost and the index below can be made. A renamed user logs in with
    # the new name (the log says which), their password unchanged.
    connection = op.get_bind()
    users = sa.table('users', sa.column('id', sa.Integer), sa.column('username', sa.String))
    rows = connection.execute(sa.select(users.c.id, users.c.username).order_by(users.c.id)).all()
    taken = {name.lower() for _id, name in rows}
    seen: set[str] = set()
    for user_id, name in rows:
        if name.lower() not in seen:
            seen.add(name.lower())
            continue
        new_name = _free_name(name, taken)
        taken.add(new_name.lower())
        seen.add(new_name.lower())
        connection.execute(sa.update(users).where(users.c.id == user_id).values(username=new_name))
        log.warning("user %s: username %r differs only by case from an older one; renamed %r", user_id, name, new_name)
    with op.batch_alter_table('users', schema=None) as batch_op:
        batch_op.create_index('uq_users_username_lower', [sa.text('lower(username)')], unique=True)


def downgrade():
    # Renamed users keep their new names: the old ones were duplicates.
    with op.batch_alter_table('users', schema=None) as batch_op:
        batch_op.drop_index('uq_users_username_lower')
