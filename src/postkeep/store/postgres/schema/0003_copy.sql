-- postkeep PostgreSQL schema, version 3: what "postkeep db copy" has copied from another
-- installation into this database (store/copy.py, store/postgres/importer.py), so that a
-- copy that was interrupted, or is run again later, goes on where it stopped instead of
-- copying twice. Conventions as in 0001_init.sql.

-- One row per source installation copied into this database. ``source`` is the source's
-- fingerprint (store/copy.py ``source_identity``), ``label`` where it was read from (a
-- path, never a DSN). ``finished``: when a run last ended with everything copied.
CREATE TABLE copy_sources (
    source   text PRIMARY KEY CHECK (source <> ''),
    label    text NOT NULL,
    started  bigint NOT NULL,
    finished bigint
);

-- Source row → target row, per kind. The target side cascades: a row deleted in this
-- database later (postkeep user del, DELETE of a mailbox, a dequeued entry) forgets its
-- mapping, and a blob freed with its last message forgets which source blob it was.
CREATE TABLE copy_domains (
    source text NOT NULL REFERENCES copy_sources(source) ON DELETE CASCADE,
    name   text NOT NULL REFERENCES domains(name) ON DELETE CASCADE,
    PRIMARY KEY (source, name)
);

CREATE TABLE copy_accounts (
    source     text NOT NULL REFERENCES copy_sources(source) ON DELETE CASCADE,
    source_id  bigint NOT NULL,
    account_id bigint NOT NULL UNIQUE REFERENCES accounts(id) ON DELETE CASCADE,
    PRIMARY KEY (source, source_id)
);

CREATE TABLE copy_mailboxes (
    source     text NOT NULL REFERENCES copy_sources(source) ON DELETE CASCADE,
    source_id  bigint NOT NULL,
    mailbox_id bigint NOT NULL UNIQUE REFERENCES mailboxes(id) ON DELETE CASCADE,
    PRIMARY KEY (source, source_id)
);

-- A source blob shared by several messages or queue entries stays one blob here.
CREATE TABLE copy_blobs (
    source    text NOT NULL REFERENCES copy_sources(source) ON DELETE CASCADE,
    source_id bigint NOT NULL,
    blob_id   bigint NOT NULL REFERENCES blobs(id) ON DELETE CASCADE,
    PRIMARY KEY (source, source_id)
);
CREATE INDEX copy_blobs_blob ON copy_blobs(blob_id);

CREATE TABLE copy_queue (
    source    text NOT NULL REFERENCES copy_sources(source) ON DELETE CASCADE,
    source_id bigint NOT NULL,
    queue_id  bigint NOT NULL UNIQUE REFERENCES outbound(id) ON DELETE CASCADE,
    PRIMARY KEY (source, source_id)
);
