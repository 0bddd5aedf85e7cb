-- CryptoVault schema, part 2: accounts and authentication.

-- A person who can log in. Email is unique case-insensitively; the password column only ever
-- holds an argon2id PHC string. TOTP secrets are base32 (RFC 6238).
CREATE TABLE users (
    id                  UUID PRIMARY KEY,
    email               TEXT        NOT NULL CHECK (length(email) BETWEEN 3 AND 254),
    name                TEXT        CHECK (name IS NULL OR length(name) <= 100),
    password_hash       TEXT        NOT NULL CHECK (password_hash LIKE '$argon2id$%'),
    role                TEXT        NOT NULL DEFAULT 'user' CHECK (role IN ('user', 'admin')),
    totp_secret         TEXT,
    totp_pending_secret TEXT,
    totp_enabled        BOOLEAN     NOT NULL DEFAULT false,
    -- The last accepted TOTP time step: a code is accepted once, never replayed.
    totp_last_step      BIGINT,
    failed_logins       INTEGER     NOT NULL DEFAULT 0 CHECK (failed_logins >= 0),
    locked_until        TIMESTAMPTZ,
    created_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    CHECK (NOT totp_enabled OR totp_secret IS NOT NULL)
);
CREATE UNIQUE INDEX users_email_lower_key ON users (lower(email));
COMMENT ON TABLE users IS 'Accounts: credentials, role, 2FA and lockout state';

-- A login family: the chain of refresh tokens (and the access tokens issued with them) that
-- one login started. Revoking the family ends the whole session.
CREATE TABLE token_families (
    id          UUID PRIMARY KEY,
    user_id     UUID        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    revoked_at  TIMESTAMPTZ,
    revoked_why TEXT
);
CREATE INDEX token_families_user_idx ON token_families (user_id);
COMMENT ON TABLE token_families IS 'One row per login session; revoked on logout, reuse or admin lock';

-- Refresh tokens, stored only as SHA-256 of the opaque token. `used_at` is set when the token
-- is rotated; presenting a used token again is reuse and revokes its family.
CREATE TABLE refresh_tokens (
    id          UUID PRIMARY KEY,
    family_id   UUID        NOT NULL REFERENCES token_families (id) ON DELETE CASCADE,
    user_id     UUID        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    token_hash  BYTEA       NOT NULL UNIQUE,
    expires_at  TIMESTAMPTZ NOT NULL,
    used_at     TIMESTAMPTZ,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX refresh_tokens_family_idx ON refresh_tokens (family_id);
COMMENT ON TABLE refresh_tokens IS 'Rotating refresh tokens (hashes only)';

-- Access tokens revoked before their expiry (logout). Rows past `expires_at` are useless and
-- are deleted by the API's housekeeping.
CREATE TABLE revoked_access_tokens (
    jti         UUID PRIMARY KEY,
    expires_at  TIMESTAMPTZ NOT NULL
);
COMMENT ON TABLE revoked_access_tokens IS 'Denylist of access-token ids until they expire';

-- API keys, stored only as SHA-256 of the key (keys carry 256 random bits, so a fast hash is
-- safe). `prefix` is shown in listings so a user can tell keys apart.
CREATE TABLE api_keys (
    id            UUID PRIMARY KEY,
    user_id       UUID        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name          TEXT        NOT NULL CHECK (length(name) BETWEEN 1 AND 64),
    prefix        TEXT        NOT NULL,
    key_hash      BYTEA       NOT NULL UNIQUE,
    scopes        TEXT[]      NOT NULL CHECK (scopes <@ ARRAY['read', 'trade']::TEXT[] AND cardinality(scopes) > 0),
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_used_at  TIMESTAMPTZ,
    revoked_at    TIMESTAMPTZ
);
CREATE INDEX api_keys_user_idx ON api_keys (user_id);
COMMENT ON TABLE api_keys IS 'Programmatic credentials with scopes read / trade';
