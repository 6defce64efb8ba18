-- postkeep PostgreSQL schema, version 1: the same tables as SQLite's migrations 1-4.
--
-- Conventions (kept by every later migration):
-- * Times are bigint microseconds since 1970-01-01 UTC, as in the SQLite schema, so both
--   backends compare and round-trip datetimes the same way. pk_now_us() is the database
--   clock in that unit: every node of a cluster judges lock and lease expiry by it.
-- * Ids that leave the store are identity columns: a sequence never hands a value out
--   twice, so a stale reference can never point at someone else's data.
-- * Addresses and domain names are stored lower-case (store/api.py); the CHECKs make a
--   missed lower() a loud error instead of a silent duplicate.
-- This file runs inside the migrator's transaction: no BEGIN/COMMIT here.

CREATE FUNCTION pk_now_us() RETURNS bigint LANGUAGE sql VOLATILE AS
$$ SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::bigint $$;

CREATE TABLE domains (
    name    text PRIMARY KEY CHECK (name <> '' AND name = lower(name)),
    created bigint NOT NULL
);

CREATE TABLE accounts (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    address       text NOT NULL UNIQUE CHECK (address = lower(address)),
    domain        text NOT NULL REFERENCES domains(name) ON DELETE RESTRICT,
    password_hash text NOT NULL,
    created       bigint NOT NULL
);
CREATE INDEX accounts_domain ON accounts(domain);

-- source is a full address, or '@domain' for that domain's catch-all.
CREATE TABLE aliases (
    source  text NOT NULL CHECK (source = lower(source)),
    target  text NOT NULL CHECK (target = lower(target)),
    domain  text NOT NULL REFERENCES domains(name) ON DELETE RESTRICT,
    created bigint NOT NULL,
    PRIMARY KEY (source, target)
);
CREATE INDEX aliases_domain ON aliases(domain);

-- 'uidvalidity' is the last UIDVALIDITY handed out (RFC 3501 §2.3.1.1); the row is
-- updated under its row lock, so two nodes never hand out the same value.
CREATE TABLE counters (
    name  text PRIMARY KEY,
    value bigint NOT NULL
);
INSERT INTO counters (name, value) VALUES ('uidvalidity', 0);

CREATE TABLE mailboxes (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id    bigint NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    name          text NOT NULL CHECK (name <> ''),
    uidvalidity   bigint NOT NULL CHECK (uidvalidity BETWEEN 1 AND 4294967295),
    uidnext       bigint NOT NULL DEFAULT 1 CHECK (uidnext BETWEEN 1 AND 4294967296),
    highestmodseq bigint NOT NULL DEFAULT 1 CHECK (highestmodseq >= 1),
    special_use   text,
    subscribed    boolean NOT NULL DEFAULT false,
    UNIQUE (account_id, name)
);

-- Message bytes exactly as received, in the database for now (one bytea per message,
-- bounded by the message size limit). STORAGE EXTERNAL: no compression, so substring()
-- reads only the TOAST chunks a range needs.
CREATE TABLE blobs (
    id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    size    bigint NOT NULL CHECK (size >= 0),
    created bigint NOT NULL,
    data    bytea NOT NULL
);
ALTER TABLE blobs ALTER COLUMN data SET STORAGE EXTERNAL;

CREATE TABLE messages (
    mailbox_id    bigint NOT NULL REFERENCES mailboxes(id) ON DELETE CASCADE,
    uid           bigint NOT NULL CHECK (uid BETWEEN 1 AND 4294967295),
    modseq        bigint NOT NULL CHECK (modseq >= 1),
    flags         text NOT NULL DEFAULT '',  -- sorted, space-separated
    internal_date bigint NOT NULL,
    internal_tz   integer NOT NULL DEFAULT 0,
    size          bigint NOT NULL,
    blob_id       bigint NOT NULL REFERENCES blobs(id),
    envelope      text,
    bodystructure text,
    PRIMARY KEY (mailbox_id, uid)
);
CREATE INDEX messages_modseq ON messages(mailbox_id, modseq);
CREATE INDEX messages_blob ON messages(blob_id);

CREATE TABLE maildrop_locks (
    account_id bigint PRIMARY KEY REFERENCES accounts(id) ON DELETE CASCADE,
    holder     text NOT NULL CHECK (holder <> ''),
    expires    bigint NOT NULL
);

CREATE TABLE outbound (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    sender         text NOT NULL,
    recipients     text NOT NULL,  -- JSON array of strings, case preserved
    blob_id        bigint NOT NULL REFERENCES blobs(id),
    created        bigint NOT NULL,
    next_attempt   bigint NOT NULL,
    attempts       integer NOT NULL DEFAULT 0,
    last_error     text,
    delay_notified boolean NOT NULL DEFAULT false,
    lease_holder   text,
    lease_until    bigint
);
CREATE INDEX outbound_due ON outbound(next_attempt, id);
CREATE INDEX outbound_blob ON outbound(blob_id);

CREATE TABLE outbound_rcpts (
    queue_id     bigint NOT NULL REFERENCES outbound(id) ON DELETE CASCADE,
    position     integer NOT NULL,
    address      text NOT NULL,
    state        text NOT NULL DEFAULT 'pending'
                 CHECK (state IN ('pending', 'delivered', 'failed')),
    attempts     integer NOT NULL DEFAULT 0,
    last_error   text,
    last_attempt bigint,
    PRIMARY KEY (queue_id, position)
);

CREATE TABLE dkim_keys (
    domain      text NOT NULL REFERENCES domains(name) ON DELETE CASCADE,
    selector    text NOT NULL CHECK (selector <> '' AND selector = lower(selector)),
    algorithm   text NOT NULL CHECK (algorithm IN ('ed25519', 'rsa')),
    private_pem text NOT NULL,
    public_txt  text NOT NULL,
    created     bigint NOT NULL,
    PRIMARY KEY (domain, selector)
);
