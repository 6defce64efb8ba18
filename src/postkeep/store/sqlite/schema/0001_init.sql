-- postkeep SQLite schema, version 1.
--
-- Conventions (kept by every later migration):
-- * Times are INTEGER microseconds since 1970-01-01 UTC, so comparisons (next_attempt <= now)
--   are integer comparisons and datetimes round-trip exactly.
-- * Ids that leave the store (accounts, mailboxes, blobs, queue entries) are AUTOINCREMENT:
--   a deleted id is never handed out again, so a stale reference held by a session or a
--   queue worker can never point at someone else's data.
-- * Addresses and domain names are stored lower-case (store/api.py); the CHECKs make a
--   missed lower() a loud error instead of a silent duplicate.
-- This file runs inside the migrator's BEGIN IMMEDIATE transaction: no BEGIN/COMMIT here.

CREATE TABLE domains (
    name    TEXT PRIMARY KEY CHECK (name <> '' AND name = lower(name)),
    created INTEGER NOT NULL
);

CREATE TABLE accounts (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    address       TEXT NOT NULL UNIQUE CHECK (address = lower(address)),
    -- The domain part of address; the foreign key is what keeps a domain with accounts
    -- from being deleted, and the index serves list_accounts(domain).
    domain        TEXT NOT NULL REFERENCES domains(name) ON DELETE RESTRICT,
    password_hash TEXT NOT NULL,
    created       INTEGER NOT NULL
);
CREATE INDEX accounts_domain ON accounts(domain);

-- source is a full address, or '@domain' for that domain's catch-all.
CREATE TABLE aliases (
    source  TEXT NOT NULL CHECK (source = lower(source)),
    target  TEXT NOT NULL CHECK (target = lower(target)),
    -- The domain part of source; aliases only make sense for local domains.
    domain  TEXT NOT NULL REFERENCES domains(name) ON DELETE RESTRICT,
    created INTEGER NOT NULL,
    PRIMARY KEY (source, target)
);
CREATE INDEX aliases_domain ON aliases(domain);

-- Store-wide counters. 'uidvalidity' is the last UIDVALIDITY handed out: new mailboxes
-- get max(last + 1, unix time), so a value never repeats in this store (RFC 3501 §2.3.1.1).
CREATE TABLE counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT INTO counters (name, value) VALUES ('uidvalidity', 0);

CREATE TABLE mailboxes (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    account_id    INTEGER NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    name          TEXT NOT NULL CHECK (name <> ''),
    -- RFC 3501 §2.3.1.1: a non-zero 32-bit value.
    uidvalidity   INTEGER NOT NULL CHECK (uidvalidity BETWEEN 1 AND 4294967295),
    -- RFC 3501 §2.3.1.1: UIDs are non-zero 32-bit and strictly ascending.
    uidnext       INTEGER NOT NULL DEFAULT 1 CHECK (uidnext BETWEEN 1 AND 4294967296),
    -- RFC 7162 §3.1.1: mod-sequences are positive 63-bit values; an empty mailbox reports 1.
    highestmodseq INTEGER NOT NULL DEFAULT 1 CHECK (highestmodseq >= 1),
    special_use   TEXT,  -- RFC 6154 attribute, e.g. '\Sent'
    subscribed    INTEGER NOT NULL DEFAULT 0 CHECK (subscribed IN (0, 1)),
    UNIQUE (account_id, name)
);

-- Message bytes exactly as received. data is last so that reading size never touches the
-- overflow pages that hold the bytes. Written with zeroblob() + incremental blob I/O.
CREATE TABLE blobs (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    size    INTEGER NOT NULL CHECK (size >= 0),
    created INTEGER NOT NULL,
    data    BLOB NOT NULL
);

-- WITHOUT ROWID: rows are clustered by (mailbox_id, uid), so a UID range is one range scan.
CREATE TABLE messages (
    mailbox_id    INTEGER NOT NULL REFERENCES mailboxes(id) ON DELETE CASCADE,
    uid           INTEGER NOT NULL CHECK (uid BETWEEN 1 AND 4294967295),
    modseq        INTEGER NOT NULL CHECK (modseq >= 1),
    flags         TEXT NOT NULL DEFAULT '',  -- sorted, space-separated
    internal_date INTEGER NOT NULL,          -- UTC microseconds
    internal_tz   INTEGER NOT NULL DEFAULT 0, -- the zone given at APPEND, minutes east of UTC
    size          INTEGER NOT NULL,
    blob_id       INTEGER NOT NULL REFERENCES blobs(id),
    envelope      TEXT,
    bodystructure TEXT,
    PRIMARY KEY (mailbox_id, uid)
) WITHOUT ROWID;
-- RFC 7162 CHANGEDSINCE / QRESYNC: "what changed after modseq N" is a range scan.
CREATE INDEX messages_modseq ON messages(mailbox_id, modseq);
-- Foreign-key checks and blob garbage collection look messages up by blob.
CREATE INDEX messages_blob ON messages(blob_id);

CREATE TABLE outbound (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    sender       TEXT NOT NULL,  -- '' for the null reverse-path; case preserved (RFC 5321 §2.4)
    recipients   TEXT NOT NULL,  -- JSON array of strings, case preserved
    blob_id      INTEGER NOT NULL REFERENCES blobs(id),
    created      INTEGER NOT NULL,
    next_attempt INTEGER NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    last_error   TEXT
);
CREATE INDEX outbound_due ON outbound(next_attempt, id);
CREATE INDEX outbound_blob ON outbound(blob_id);
