-- postkeep SQLite schema, version 3: durable per-recipient state of the outbound queue.
-- Conventions as in 0001_init.sql (times are INTEGER microseconds since the epoch, UTC).

-- delay_notified: the sender got its one "delayed" DSN (RFC 3464 Action: delayed).
-- lease_holder/lease_until: who is delivering the entry now (WriteTx.claim_due). A lease
-- whose lease_until is past belongs to a holder that died: the next claim takes it over.
-- outbound.attempts and outbound.last_error now count delivery rounds and hold the last
-- problem of any recipient (what OutboundRow shows). The detail is per recipient below.
ALTER TABLE outbound ADD COLUMN delay_notified INTEGER NOT NULL DEFAULT 0
    CHECK (delay_notified IN (0, 1));
ALTER TABLE outbound ADD COLUMN lease_holder TEXT;
ALTER TABLE outbound ADD COLUMN lease_until INTEGER;

-- One row per recipient of a queue entry, in the order given to enqueue (position).
-- address keeps its case (RFC 5321 §2.4: a remote local part is case-sensitive).
-- A recipient is 'pending' until a remote server accepts it ('delivered') or refuses it
-- for good or the queue gave up ('failed'). The final states never change again.
CREATE TABLE outbound_rcpts (
    queue_id     INTEGER NOT NULL REFERENCES outbound(id) ON DELETE CASCADE,
    position     INTEGER NOT NULL,
    address      TEXT NOT NULL,
    state        TEXT NOT NULL DEFAULT 'pending'
                 CHECK (state IN ('pending', 'delivered', 'failed')),
    attempts     INTEGER NOT NULL DEFAULT 0,
    last_error   TEXT,
    last_attempt INTEGER,
    PRIMARY KEY (queue_id, position)
) WITHOUT ROWID;

-- Entries queued before this version: every recipient still pending.
INSERT INTO outbound_rcpts (queue_id, position, address, attempts, last_error)
SELECT o.id, j.key, j.value, o.attempts, o.last_error
FROM outbound o, json_each(o.recipients) j;
