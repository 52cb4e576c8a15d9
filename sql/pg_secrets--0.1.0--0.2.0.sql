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
