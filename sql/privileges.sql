-- Runs after every function exists. Functions are reachable only through the interim roles;
-- each function still checks the caller's right on the secret it touches.
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA secrets FROM PUBLIC;
GRANT USAGE ON SCHEMA secrets TO secrets_admin, secrets_reader;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA secrets TO secrets_admin, secrets_reader;
