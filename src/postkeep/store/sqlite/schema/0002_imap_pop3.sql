-- postkeep SQLite schema, version 2: what IMAP and POP3 sessions need.
-- Conventions as in 0001_init.sql (times are INTEGER microseconds since the epoch, UTC).

-- store.uids(): every UID of a mailbox, ascending, without touching the message rows. In a
-- WITHOUT ROWID table the primary key *is* the table, so a scan of it reads each row's
-- envelope and bodystructure too; this index holds only (mailbox_id, uid), and SQLite
-- picks it as a covering index for "SELECT uid ... WHERE mailbox_id = ? ORDER BY uid".
CREATE INDEX messages_uids ON messages(mailbox_id, uid);

-- RFC 1939 §8: a POP3 session has exclusive access to its maildrop. One row per locked
-- account. A lock whose expires is in the past belongs to a session (or a whole process)
-- that died without releasing it: the next acquire takes it over. The times come from
-- the clock of the process that writes them, so every process sharing this file compares
-- like with like.
CREATE TABLE maildrop_locks (
    account_id INTEGER PRIMARY KEY REFERENCES accounts(id) ON DELETE CASCADE,
    holder     TEXT NOT NULL CHECK (holder <> ''),
    expires    INTEGER NOT NULL
);
