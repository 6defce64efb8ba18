-- postkeep SQLite schema, version 5: passwords that crossed the wire in plaintext
-- (auth/exposure.py). Conventions as in 0001_init.sql (times are INTEGER microseconds
-- since the epoch, UTC).

-- One row per (account, client address, service) that sent the account's *correct*
-- password before TLS and was refused. Any row means the account is "exposed"; the
-- [security] exposed_password policy decides what that does to logins. A new password
-- (set_password) or an admin's "postkeep user unlock" deletes the rows; so does deleting
-- the account. The password itself is never stored.
CREATE TABLE password_exposures (
    account_id  INTEGER NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    peer        TEXT NOT NULL,
    service     TEXT NOT NULL,
    first_at    INTEGER NOT NULL,
    last_at     INTEGER NOT NULL,
    -- When the owner was last told about this (peer, service), so that a client that
    -- keeps trying does not flood the INBOX; NULL: not yet.
    notified_at INTEGER,
    PRIMARY KEY (account_id, peer, service)
) WITHOUT ROWID;
