-- pg_secrets 0.1.0 to 0.2.0 (ALTER EXTENSION pg_secrets UPDATE). The upgrade test checks that
-- a 0.1.0 schema updated with this file has every function, view, column, privilege, policy,
-- index and trigger a fresh install of 0.2.0 has.
\echo Use "ALTER EXTENSION pg_secrets UPDATE" to load this file. \quit

-- The list view reads through a function, and no role but the owner reads secrets.secret:
-- EXPLAIN ANALYZE of a query on the table counted the rows its policy removed, which told any
-- role which secret names exist.
CREATE FUNCTION "secret_list_rows"() RETURNS TABLE (
	"id" uuid,
	"name" TEXT,
	"description" TEXT,
	"tags" jsonb,
	"owner_oid" oid,
	"key_id" TEXT,
	"created_at" timestamp with time zone,
	"last_changed_at" timestamp with time zone,
	"last_accessed_on" date,
	"deleted_at" timestamp with time zone,
	"purge_at" timestamp with time zone,
	"rotation_enabled" bool,
	"rotator" TEXT,
	"rotation_schedule" TEXT,
	"next_rotation_at" timestamp with time zone,
	"last_rotated_at" timestamp with time zone
)
STRICT
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'secret_list_rows_wrapper';
REVOKE EXECUTE ON FUNCTION secrets.secret_list_rows() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION secrets.secret_list_rows() TO secrets_user;

CREATE OR REPLACE VIEW secrets.secret_list WITH (security_invoker = true) AS
    SELECT id, name, description, tags, owner_oid::regrole AS owner, key_id, created_at,
           last_changed_at, last_accessed_on, deleted_at, purge_at, rotation_enabled, rotator,
           rotation_schedule, next_rotation_at, last_rotated_at
    FROM secrets.secret_list_rows();
REVOKE SELECT (id, name, description, tags, owner_role, key_id, created_at, changed_at,
               last_accessed_on, deleted_at, purge_at, rotation_enabled, rotator,
               rotation_schedule, next_rotation_at, last_rotated_at)
    ON secrets.secret FROM secrets_user;

-- The append-only trigger names the table it refuses, and guards the retention's anchors too.
CREATE OR REPLACE FUNCTION secrets.audit_is_append_only() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $append_only$
BEGIN
    IF TG_OP = 'DELETE' AND TG_TABLE_NAME = 'audit_record' AND secrets.audit_retention_running() THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION 'the audit trail is append-only: % on secrets.% is not allowed', TG_OP, TG_TABLE_NAME
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'Old records are removed with secrets.purge_audit_log(older_than).';
END
$append_only$;
-- What the retention removed stays on record the same way: an anchor is never changed or
-- removed, so who purged which prefix, and the hash the rest chains to, cannot be rewritten.
-- (Anchors are inserted by purge_audit_log and by a restore; verify_audit_log refuses one that
-- claims records removed that are still there.)
CREATE TRIGGER audit_anchor_no_change BEFORE UPDATE OR DELETE ON secrets.audit_anchor
    FOR EACH ROW EXECUTE FUNCTION secrets.audit_is_append_only();
CREATE TRIGGER audit_anchor_no_truncate BEFORE TRUNCATE ON secrets.audit_anchor
    FOR EACH STATEMENT EXECUTE FUNCTION secrets.audit_is_append_only();
ALTER TABLE secrets.audit_anchor ENABLE ALWAYS TRIGGER audit_anchor_no_change;
ALTER TABLE secrets.audit_anchor ENABLE ALWAYS TRIGGER audit_anchor_no_truncate;
