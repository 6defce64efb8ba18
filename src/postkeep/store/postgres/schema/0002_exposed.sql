-- postkeep PostgreSQL schema, version 2: passwords that crossed the wire in plaintext
-- (auth/exposure.py); SQLite's migration 5. Conventions as in 0001_init.sql.

-- One row per (account, client address, service) that sent the account's *correct*
-- password before TLS and was refused. A new password (set_password), "postkeep user
-- unlock" or deleting the account deletes the rows. The password itself is never stored.
CREATE TABLE password_exposures (
    account_id  bigint NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    peer        text NOT NULL,
    service     text NOT NULL,
    first_at    bigint NOT NULL,
    last_at     bigint NOT NULL,
    -- When the owner was last told about this (peer, service); NULL: not yet.
    notified_at bigint,
    PRIMARY KEY (account_id, peer, service)
);
