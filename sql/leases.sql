-- Process leases (migrations/0011.fence.py, storage/domain/liveness.py).  Liveness is
-- judged on the database's clock: a lease is live while its heartbeat (or the database
-- server's start, if later) is younger than the TTL ($n seconds).

-- name: lease_register
-- $1 lease_id, $2 holder (label), $3 host, $4 pid
INSERT INTO <prefix>_leases (lease_id, holder, host, pid) VALUES ($1, $2, $3, $4)
RETURNING lease_id;

-- name: lease_beat
-- $1 lease_id: renewed; no row when the lease was removed (it had expired)
UPDATE <prefix>_leases SET heartbeat_at = now() WHERE lease_id = $1 RETURNING lease_id;

-- name: lease_drop
-- $1 lease_ids
DELETE FROM <prefix>_leases WHERE lease_id = ANY ($1::uuid[]);

-- name: lease_others_live
-- $1 own lease_id, $2 TTL seconds: the other leases still live.  Time the database was
-- down does not count against a lease (its holder could not renew it): a heartbeat
-- counts from the server's start at the earliest
SELECT lease_id, holder, host, pid, heartbeat_at FROM <prefix>_leases
WHERE lease_id <> $1
  AND greatest(heartbeat_at, pg_postmaster_start_time()) > now() - make_interval(secs => $2);

-- name: lease_purge
-- $1 seconds: leases expired that long ago are forgotten
DELETE FROM <prefix>_leases WHERE heartbeat_at < now() - make_interval(secs => $1);
