-- Schema v8: a held lock is a lease.

-- A holder on another host, or a PID the OS has since reused, cannot be checked for
-- liveness, so a lock is held only until its lease runs out: its holder moves expires_at
-- forward while it works (every third of the lease), and a lock whose lease has run out
-- is taken over by the next one to ask, whoever held it. A row written before this
-- column existed has none: its lease counts from acquired_at.
ALTER TABLE locks ADD COLUMN expires_at TIMESTAMP;
