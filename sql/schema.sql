-- pg_secrets storage. Every value column holds AES-256-GCM ciphertext; no plaintext is ever
-- written here. The functions in schema `secrets` are the only way in: they are SECURITY
-- DEFINER and owned by the extension owner, and nobody else has any privilege on these tables.

-- Roles: `secrets_admin` may do everything, `secrets_reader` may get and describe every
-- secret, `secrets_auditor` reads the whole audit trail, `secrets_user` may call the functions (grants, policies and ownership decide the
-- rest). Roles are cluster-wide, so another database may already have created them.
DO $roles$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'secrets_admin') THEN
        CREATE ROLE secrets_admin NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'secrets_reader') THEN
        CREATE ROLE secrets_reader NOLOGIN;
    END IF;
    -- May call the functions; what it may do with each secret is decided per secret.
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'secrets_user') THEN
        CREATE ROLE secrets_user NOLOGIN;
    END IF;
    -- Reads the whole audit trail.
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'secrets_auditor') THEN
        CREATE ROLE secrets_auditor NOLOGIN;
    END IF;
END
$roles$;

-- One row per master key id ever used to write: an AES-GCM encryption of a fixed text under
-- that key. Decrypting it proves the configured key is the one the data was written with, so
-- a wrong key gives a clear error instead of a wall of integrity failures.
CREATE TABLE secrets.master_key (
    key_id      text PRIMARY KEY,
    check_value bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT pg_catalog.now()
);

CREATE TABLE secrets.secret (
    id               uuid PRIMARY KEY,
    name             text NOT NULL CONSTRAINT secret_name_key UNIQUE
                     CHECK (name ~ '^[A-Za-z0-9/_+=.@-]+$' AND pg_catalog.length(name) <= 512),
    description      text CHECK (pg_catalog.length(description) <= 2048),
    tags             jsonb NOT NULL DEFAULT '{}' CHECK (pg_catalog.jsonb_typeof(tags) = 'object'),
    -- regrole, not oid: pg_dump writes the role's name, so a restore into another cluster
    -- keeps ownership.
    owner_role       regrole NOT NULL,
    -- the master key new versions are wrapped with
    key_id           text NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT pg_catalog.now(),
    changed_at       timestamptz NOT NULL DEFAULT pg_catalog.now(),
    -- day granularity, written at most once per day, so reads stay reads
    last_accessed_on date,
    deleted_at       timestamptz,
    purge_at         timestamptz,
    -- rotation settings: `postgres-single-user`, `postgres-alternating-users` or
    -- `command:<program>`; a schedule `rate(...)`/`cron(...)`; the window start times spread in
    rotator          text,
    rotation_schedule text,
    rotation_window  interval,
    rotation_enabled boolean NOT NULL DEFAULT false,
    next_rotation_at timestamptz,
    last_rotated_at  timestamptz,
    -- the version whose credential names what a database rotation may act on (server, role,
    -- admin secret): CURRENT when a role with manage configured rotation, then each rotation's
    -- result; a `put` naming another target is not rotated until rotation is configured again
    rotation_target_version_id uuid,
    -- A copy of the CURRENT version's row, kept by the triggers below, so that reading
    -- CURRENT is one index probe instead of three. NULL when no version is CURRENT.
    current_version_id  uuid,
    current_value_kind  text,
    current_key_id      text,
    current_wrapped_key bytea,
    current_ciphertext  bytea,
    CHECK ((deleted_at IS NULL) = (purge_at IS NULL)),
    CHECK (NOT rotation_enabled OR (rotator IS NOT NULL AND rotation_schedule IS NOT NULL))
);
CREATE INDEX secret_purge_at ON secrets.secret (purge_at) WHERE purge_at IS NOT NULL;

-- Immutable once written. The data key is wrapped by the master key `key_id`; the value is
-- encrypted with the data key, bound (as AES-GCM associated data) to secret id, version id
-- and value kind, so a row copied or moved elsewhere fails to decrypt.
CREATE TABLE secrets.secret_version (
    id                   uuid CONSTRAINT secret_version_pkey PRIMARY KEY,
    secret_id            uuid NOT NULL REFERENCES secrets.secret (id) ON DELETE CASCADE,
    value_kind           text NOT NULL CHECK (value_kind IN ('string', 'binary')),
    key_id               text NOT NULL,
    wrapped_key          bytea NOT NULL,
    ciphertext           bytea NOT NULL,
    client_request_token text,
    created_at           timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
    UNIQUE (secret_id, id),
    UNIQUE (secret_id, client_request_token)
);
CREATE INDEX secret_version_by_age ON secrets.secret_version (secret_id, created_at DESC);

-- Staging labels. The primary key is the rule "a label is on at most one version of a
-- secret"; the foreign key keeps a label on a version of its own secret.
CREATE TABLE secrets.version_label (
    secret_id  uuid NOT NULL,
    label      text NOT NULL
               CHECK (label ~ '^[A-Za-z0-9_.-]+$' AND pg_catalog.length(label) <= 256),
    version_id uuid NOT NULL,
    CONSTRAINT version_label_pkey PRIMARY KEY (secret_id, label),
    FOREIGN KEY (secret_id, version_id)
        REFERENCES secrets.secret_version (secret_id, id) ON DELETE CASCADE
);
CREATE INDEX version_label_by_version ON secrets.version_label (version_id);

-- Keeps each secret's copy of its CURRENT version equal to what version_label and
-- secret_version say, whoever changes them and however: the triggers fire ALWAYS, also with
-- session_replication_role = replica. A label pointing at another secret's version (only
-- tampering makes one) leaves no copy, and the read falls back to the probes that refuse it.
CREATE FUNCTION secrets.refresh_current_copy() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    affected uuid[] := '{}';
    secret_to_refresh uuid;
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        UPDATE secrets.secret
        SET (current_version_id, current_value_kind, current_key_id, current_wrapped_key,
             current_ciphertext) = (NULL, NULL, NULL, NULL, NULL)
        WHERE current_version_id IS NOT NULL;
        RETURN NULL;
    END IF;
    IF TG_TABLE_NAME = 'version_label' THEN
        IF TG_OP <> 'INSERT' THEN
            IF OLD.label = 'CURRENT' THEN
                affected := affected || OLD.secret_id;
            END IF;
        END IF;
        IF TG_OP <> 'DELETE' THEN
            IF NEW.label = 'CURRENT' THEN
                affected := affected || NEW.secret_id;
            END IF;
        END IF;
    ELSE
        affected := ARRAY(SELECT secret_id FROM secrets.version_label
                          WHERE label = 'CURRENT' AND version_id = OLD.id);
    END IF;
    -- One secret at a time, in id order, each by its primary key: a plan over the whole array
    -- can be cached as a sequential scan while the table is small, and stay one as it grows.
    FOR secret_to_refresh IN SELECT DISTINCT a FROM unnest(affected) a ORDER BY a LOOP
        -- Locked first, and the labels read by a statement of its own: an UPDATE's subquery
        -- keeps the snapshot the UPDATE began with, so after waiting for a writer of the same
        -- secret it would copy the version that writer's labels no longer point at.
        PERFORM FROM secrets.secret WHERE id = secret_to_refresh FOR NO KEY UPDATE;
        UPDATE secrets.secret
        SET (current_version_id, current_value_kind, current_key_id, current_wrapped_key,
             current_ciphertext) = (
            SELECT v.id, v.value_kind, v.key_id, v.wrapped_key, v.ciphertext
            FROM secrets.version_label l
            JOIN secrets.secret_version v ON v.id = l.version_id AND v.secret_id = l.secret_id
            WHERE l.secret_id = secret_to_refresh AND l.label = 'CURRENT')
        WHERE id = secret_to_refresh;
    END LOOP;
    RETURN NULL;
END
$$;
CREATE TRIGGER version_label_current_copy AFTER INSERT OR UPDATE OR DELETE
    ON secrets.version_label FOR EACH ROW EXECUTE FUNCTION secrets.refresh_current_copy();
CREATE TRIGGER secret_version_current_copy AFTER UPDATE OR DELETE
    ON secrets.secret_version FOR EACH ROW EXECUTE FUNCTION secrets.refresh_current_copy();
CREATE TRIGGER version_label_truncated AFTER TRUNCATE
    ON secrets.version_label FOR EACH STATEMENT EXECUTE FUNCTION secrets.refresh_current_copy();
CREATE TRIGGER secret_version_truncated AFTER TRUNCATE
    ON secrets.secret_version FOR EACH STATEMENT EXECUTE FUNCTION secrets.refresh_current_copy();
ALTER TABLE secrets.version_label ENABLE ALWAYS TRIGGER version_label_current_copy;
ALTER TABLE secrets.secret_version ENABLE ALWAYS TRIGGER secret_version_current_copy;
ALTER TABLE secrets.version_label ENABLE ALWAYS TRIGGER version_label_truncated;
ALTER TABLE secrets.secret_version ENABLE ALWAYS TRIGGER secret_version_truncated;
CREATE INDEX secret_rotation_due ON secrets.secret (next_rotation_at) WHERE rotation_enabled;

-- One row per rotation: the four steps create -> set -> test -> finish, with `step` the next
-- one to run. Each step commits its own progress here, so a crash resumes where it stopped.
-- The partial unique index is the rule "one rotation per secret at a time".
CREATE TABLE secrets.rotation (
    id                 uuid PRIMARY KEY,
    secret_id          uuid NOT NULL REFERENCES secrets.secret (id) ON DELETE CASCADE,
    rotator            text NOT NULL,
    pending_version_id uuid,
    step               text NOT NULL CHECK (step IN ('create', 'set', 'test', 'finish', 'done')),
    state              text NOT NULL
                       CHECK (state IN ('running', 'succeeded', 'failed', 'abandoned', 'cancelled')),
    attempts           integer NOT NULL DEFAULT 0,
    last_error         text,
    note               text,
    next_attempt_at    timestamptz NOT NULL DEFAULT pg_catalog.now(),
    started_at         timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
    finished_at        timestamptz,
    CHECK ((state = 'running') = (finished_at IS NULL))
);
CREATE UNIQUE INDEX rotation_one_running ON secrets.rotation (secret_id) WHERE state = 'running';
CREATE INDEX rotation_by_secret ON secrets.rotation (secret_id, started_at DESC);

-- Identity-based grants: `grantee` (and its members) may do `actions` on every secret whose
-- name matches `name_pattern` (`*` any run of characters, `?` one) until `valid_until`.
-- A standing grant is one per (pattern, grantee); grants made by approving a request stand
-- on their own and expire with it.
CREATE TABLE secrets.access_grant (
    id           uuid PRIMARY KEY,
    name_pattern text NOT NULL
                 CHECK (name_pattern ~ '^[A-Za-z0-9/_+=.@*?-]+$' AND pg_catalog.length(name_pattern) <= 512),
    grantee      regrole NOT NULL,
    actions      text[] NOT NULL
                 CHECK (pg_catalog.cardinality(actions) > 0
                        AND actions <@ '{get,describe,put,rotate,delete,manage}'::text[]),
    valid_until  timestamptz,
    granted_by   regrole NOT NULL,
    granted_at   timestamptz NOT NULL DEFAULT pg_catalog.now(),
    request_id   uuid
);
CREATE UNIQUE INDEX access_grant_standing ON secrets.access_grant (name_pattern, grantee)
    WHERE request_id IS NULL;

-- A secret's resource policy, validated when it is put.
CREATE TABLE secrets.resource_policy (
    secret_id  uuid PRIMARY KEY REFERENCES secrets.secret (id) ON DELETE CASCADE,
    policy     jsonb NOT NULL,
    changed_by regrole NOT NULL,
    changed_at timestamptz NOT NULL DEFAULT pg_catalog.now()
);

-- Time-bound access with approval. Kept by name, so requesting reveals nothing about whether
-- a secret exists.
CREATE TABLE secrets.access_request (
    id           uuid PRIMARY KEY,
    secret_name  text NOT NULL,
    requester    regrole NOT NULL,
    actions      text[] NOT NULL
                 CHECK (pg_catalog.cardinality(actions) > 0
                        AND actions <@ '{get,describe,put,rotate,delete,manage}'::text[]),
    duration     interval NOT NULL,
    reason       text NOT NULL CHECK (pg_catalog.length(reason) BETWEEN 1 AND 2048),
    state        text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'approved', 'denied')),
    requested_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
    decided_by   regrole,
    decided_at   timestamptz,
    grant_id     uuid
);
CREATE INDEX access_request_pending ON secrets.access_request (secret_name) WHERE state = 'pending';

-- The audit trail. Only the background worker inserts (ids without gaps, each row chained
-- to the previous by SHA-256); nobody updates or deletes, the owner included: the triggers
-- below fire even with session_replication_role = replica. Retention removes whole prefixes
-- and leaves an anchor with the hash of the last row it removed.
CREATE TABLE secrets.audit_record (
    id               bigint PRIMARY KEY,
    at               timestamptz NOT NULL,
    "session_user"   text NOT NULL,
    "current_user"   text NOT NULL,
    action           text NOT NULL,
    secret_name      text,
    secret_id        uuid,
    version_id       uuid,
    version_stage    text,
    outcome          text NOT NULL CHECK (outcome IN ('allowed', 'denied', 'error')),
    sqlstate         text,
    client_addr      text,
    client_port      integer,
    application_name text,
    backend_pid      integer NOT NULL,
    -- a JSON object kept as text: the hash covers it exactly as written (the view shows jsonb)
    details          text NOT NULL,
    prev_hash        bytea NOT NULL,
    hash             bytea NOT NULL
);
-- BRIN: time ranges stay cheap to find and the index costs almost nothing to maintain, which
-- matters at thousands of records per second. Per-secret questions go through audit_reader.
CREATE INDEX audit_record_at ON secrets.audit_record USING brin (at);

-- Who has read which secret, since the trail began (maintained by the worker from the trail):
-- what the "first read" alarm and offboarding by actual reads ask.
CREATE TABLE secrets.audit_reader (
    role           text NOT NULL,
    secret_id      uuid NOT NULL,
    secret_name    text NOT NULL,
    first_at       timestamptz NOT NULL,
    first_audit_id bigint NOT NULL,
    PRIMARY KEY (role, secret_id)
);
CREATE TABLE secrets.audit_reader_progress (
    singleton       boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    through_id      bigint NOT NULL
);
INSERT INTO secrets.audit_reader_progress (through_id) VALUES (0);

-- How far the worker has drained each audit queue file (queue.rs), committed with the records
-- themselves: after a crash between that commit and freeing the slots, the worker skips what
-- the table already holds. Not dumped: it describes this cluster's queue file.
CREATE TABLE secrets.audit_queue_progress (
    ring_id         uuid PRIMARY KEY,
    through         bigint NOT NULL CHECK (through >= 0)
);

CREATE TABLE secrets.audit_anchor (
    removed_through bigint PRIMARY KEY,
    anchor_hash     bytea NOT NULL,
    removed_count   bigint NOT NULL,
    removed_by      regrole NOT NULL,
    removed_at      timestamptz NOT NULL DEFAULT pg_catalog.now()
);

CREATE FUNCTION secrets.audit_is_append_only() RETURNS trigger
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
CREATE TRIGGER audit_record_no_change BEFORE UPDATE OR DELETE ON secrets.audit_record
    FOR EACH ROW EXECUTE FUNCTION secrets.audit_is_append_only();
CREATE TRIGGER audit_record_no_truncate BEFORE TRUNCATE ON secrets.audit_record
    FOR EACH STATEMENT EXECUTE FUNCTION secrets.audit_is_append_only();
ALTER TABLE secrets.audit_record ENABLE ALWAYS TRIGGER audit_record_no_change;
ALTER TABLE secrets.audit_record ENABLE ALWAYS TRIGGER audit_record_no_truncate;
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
REVOKE EXECUTE ON FUNCTION secrets.audit_is_append_only() FROM PUBLIC;

-- Alarm rules, evaluated by the worker over records newer than `checked_through`, and what
-- they raised (also sent as NOTIFY pg_secrets_alarm). Rotation failures land here too.
CREATE TABLE secrets.alarm_rule (
    id              uuid PRIMARY KEY,
    name            text NOT NULL UNIQUE,
    kind            text NOT NULL CHECK (kind IN ('first_read', 'rate', 'denials', 'off_hours')),
    params          jsonb NOT NULL,
    enabled         boolean NOT NULL DEFAULT true,
    checked_through bigint NOT NULL DEFAULT 0,
    created_by      regrole NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT pg_catalog.now()
);
CREATE TABLE secrets.alarm_event (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
    rule_id     uuid,
    rule_name   text NOT NULL,
    kind        text NOT NULL,
    role        text,
    address     text,
    secret_name text,
    details     jsonb NOT NULL
);
CREATE INDEX alarm_event_at ON secrets.alarm_event (at);
CREATE INDEX alarm_event_rule ON secrets.alarm_event (rule_id, at);

REVOKE ALL ON ALL TABLES IN SCHEMA secrets FROM PUBLIC;

-- pg_dump of a database must carry the secrets along: extension tables are otherwise skipped.
SELECT pg_catalog.pg_extension_config_dump('secrets.master_key', '');
SELECT pg_catalog.pg_extension_config_dump('secrets.secret', '');
SELECT pg_catalog.pg_extension_config_dump('secrets.secret_version', '');
SELECT pg_catalog.pg_extension_config_dump('secrets.version_label', '');
SELECT pg_catalog.pg_extension_config_dump('secrets.rotation', '');
SELECT pg_catalog.pg_extension_config_dump('secrets.access_grant', '');
SELECT pg_catalog.pg_extension_config_dump('secrets.resource_policy', '');
SELECT pg_catalog.pg_extension_config_dump('secrets.access_request', '');
SELECT pg_catalog.pg_extension_config_dump('secrets.audit_record', '');
SELECT pg_catalog.pg_extension_config_dump('secrets.audit_anchor', '');
-- audit_reader and its progress row are derived from the trail and rebuilt after a restore.
SELECT pg_catalog.pg_extension_config_dump('secrets.alarm_rule', '');
SELECT pg_catalog.pg_extension_config_dump('secrets.alarm_event', '');
SELECT pg_catalog.pg_extension_config_dump('secrets.alarm_event_id_seq', '');
