-- Login attempts, shared by every broadcast (see src/throttle.rs for the rule). One row per
-- key: a (name, address) pair, a name alone, or an address alone.
CREATE TABLE login_throttle (
    key      TEXT PRIMARY KEY,
    -- Attempts counted since the key last succeeded or went quiet; an attempt counts when it
    -- is let through, before the password is checked, so parallel attempts cannot all pass.
    failures INTEGER NOT NULL DEFAULT 0,
    -- No attempt under this key is let through before then.
    next_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- A (name, address) pair that has logged in: name-wide and address-wide delays skip it.
    trusted  BOOLEAN NOT NULL DEFAULT false
);
CREATE INDEX login_throttle_last ON login_throttle (last_at);
