-- Least privilege for tiu-core on PostgreSQL.
--
-- Run as the role that owns the schema (the one that runs `alembic upgrade head`),
-- after migrating, with psql variables `app` (the application's login role) and
-- `schema` (default public):
--
--     psql -v app=tiu_app -v schema=public -f sql/app_role.sql
--
-- The application may read and append to the event log, never change or remove a
-- row of it: no UPDATE, DELETE or TRUNCATE on `events` (the append-only trigger
-- refuses them too, even to the owner, except the audited retention path, which
-- therefore runs as the owner: `tiu audit archive`). It owns nothing else either;
-- read models, checkpoints, key claims, snapshots and subject keys get plain DML.
-- Replays (`tiu replay`) create, drop and rename read-model tables, so they run as
-- the owner as well, like migrations.

\if :{?schema}
\else
\set schema public
\endif

SELECT format('CREATE ROLE %I LOGIN', :'app')
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'app') \gexec

SELECT format('GRANT USAGE ON SCHEMA %I TO %I', :'schema', :'app') \gexec
SELECT format('REVOKE ALL ON ALL TABLES IN SCHEMA %I FROM %I', :'schema', :'app') \gexec
SELECT format('GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA %I TO %I',
              :'schema', :'app') \gexec
SELECT format('REVOKE UPDATE, DELETE, TRUNCATE ON %I.events FROM %I', :'schema', :'app') \gexec
SELECT format('REVOKE INSERT, UPDATE, DELETE ON %I.alembic_version FROM %I', :'schema', :'app') \gexec
