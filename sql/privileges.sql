-- Runs after every function exists.

-- Row-level security: a query on the metadata sees exactly the secrets the caller may
-- describe, decided by the same predicate as the functions. Forced, so even the tables' owner
-- is subject to it unless it is a superuser (the extension's functions run as the owner and
-- check access themselves; other roles read the metadata through them and the list view).
-- The other tables have no policy: nobody but a superuser reads them.
ALTER TABLE secrets.secret ENABLE ROW LEVEL SECURITY;
ALTER TABLE secrets.secret FORCE ROW LEVEL SECURITY;
CREATE POLICY describable ON secrets.secret FOR SELECT
    USING (secrets.may_describe(id, name, owner_role));
DO $rls$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['secret_version', 'version_label', 'master_key', 'rotation',
                             'access_grant', 'resource_policy', 'access_request',
                             'audit_anchor', 'audit_reader', 'audit_reader_progress', 'audit_queue_progress',
                             'alarm_rule', 'alarm_event'] LOOP
        EXECUTE pg_catalog.format('ALTER TABLE secrets.%I ENABLE ROW LEVEL SECURITY', t);
        EXECUTE pg_catalog.format('ALTER TABLE secrets.%I FORCE ROW LEVEL SECURITY', t);
    END LOOP;
END
$rls$;

-- The list view: metadata only (values live in secret_version, which no one may read), the
-- secrets the reader may describe. It reads through a function, and no role but the owner may
-- read the table: EXPLAIN ANALYZE of a query on the table itself would count the rows the
-- policy removed (a probe of `name = '...'` or of a range of names tells which names exist).
CREATE VIEW secrets.secret_list WITH (security_invoker = true) AS
    SELECT id, name, description, tags, owner_oid::regrole AS owner, key_id, created_at,
           last_changed_at, last_accessed_on, deleted_at, purge_at, rotation_enabled, rotator,
           rotation_schedule, next_rotation_at, last_rotated_at
    FROM secrets.secret_list_rows();
GRANT SELECT ON secrets.secret_list TO secrets_user;

-- The audit trail: secrets_auditor sees every record, anyone else the records of secrets it
-- may manage. Never a value: records hold none.
ALTER TABLE secrets.audit_record ENABLE ROW LEVEL SECURITY;
ALTER TABLE secrets.audit_record FORCE ROW LEVEL SECURITY;
CREATE POLICY auditable ON secrets.audit_record FOR SELECT
    USING (secrets.may_read_audit(secret_id, secret_name));
CREATE VIEW secrets.audit_log WITH (security_invoker = true, security_barrier = true) AS
    SELECT id, at, "session_user", "current_user", action, secret_name, secret_id, version_id,
           version_stage, outcome, sqlstate, client_addr::inet AS client_addr, client_port,
           application_name, backend_pid, details::jsonb AS details
    FROM secrets.audit_record;
GRANT SELECT (id, at, "session_user", "current_user", action, secret_name, secret_id, version_id,
              version_stage, outcome, sqlstate, client_addr, client_port, application_name,
              backend_pid, details)
    ON secrets.audit_record TO secrets_user;
GRANT SELECT ON secrets.audit_log TO secrets_user;

-- Functions are reachable through secrets_user; each still decides per secret.
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA secrets FROM PUBLIC;
GRANT USAGE ON SCHEMA secrets TO secrets_user;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA secrets TO secrets_user;
GRANT secrets_user TO secrets_admin, secrets_reader, secrets_auditor;
