-- postkeep SQLite schema, version 4: DKIM signing keys of local domains (mail/dkim.py).
-- Conventions as in 0001_init.sql (times are INTEGER microseconds since the epoch, UTC).

-- One row per key; a domain has an Ed25519 and an RSA key, more while a key is rotated.
-- The keys live here rather than in files so that every node signs with the same keys.
-- private_pem is the unencrypted PKCS#8 PEM: this database is as secret as the keys
-- (it already holds the password hashes). Deleting the domain deletes its keys: a key is
-- worth nothing without the domain, and a re-added domain gets new ones.
CREATE TABLE dkim_keys (
    domain      TEXT NOT NULL REFERENCES domains(name) ON DELETE CASCADE,
    -- RFC 6376 §3.1: a selector is a DNS name, compared case-insensitively; kept lower-case.
    selector    TEXT NOT NULL CHECK (selector <> '' AND selector = lower(selector)),
    algorithm   TEXT NOT NULL CHECK (algorithm IN ('ed25519', 'rsa')),
    private_pem TEXT NOT NULL,
    public_txt  TEXT NOT NULL,
    created     INTEGER NOT NULL,
    PRIMARY KEY (domain, selector)
) WITHOUT ROWID;
