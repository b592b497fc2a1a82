-- A database written by latentedge's first (unversioned, user_version 0) store schema:
-- node-a (latent_dim 4, 3 classes) with one committed upload of 6 samples.
BEGIN TRANSACTION;
CREATE TABLE chunks (
    upload_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    samples INTEGER NOT NULL,
    latent_dtype TEXT NOT NULL,
    latent_scale REAL NOT NULL,
    latent_dim INTEGER NOT NULL,
    latents BLOB NOT NULL,
    label_dtype TEXT NOT NULL,
    labels BLOB NOT NULL,
    PRIMARY KEY (upload_id, seq)
);
INSERT INTO "chunks" VALUES('up-1',0,6,'float32',0.0,4,X'00000000CDCCCC3DCDCC4C3E9A99993ECDCCCC3E0000003F9A99193F3333333FCDCC4C3F6666663F0000803FCDCC8C3F9A99993F6666A63F3333B33F0000C03FCDCCCC3F9A99D93F6666E63F3333F33F0000004066660640CDCC0C4033331340','int64',X'000000000000000001000000000000000200000000000000000000000000000001000000000000000200000000000000');
CREATE TABLE classifiers (
    version INTEGER PRIMARY KEY AUTOINCREMENT,
    meta_json TEXT NOT NULL,
    blob BLOB NOT NULL,
    trained_at REAL NOT NULL
);
CREATE TABLE delta_chunks (
    upload_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    tensors INTEGER NOT NULL,
    params INTEGER NOT NULL,
    payload_bytes INTEGER NOT NULL,
    blob BLOB NOT NULL,
    PRIMARY KEY (upload_id, seq)
);
CREATE TABLE deltas (
    upload_id TEXT PRIMARY KEY,
    node_id TEXT NOT NULL,
    base_version INTEGER NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('open', 'committed')),
    samples INTEGER NOT NULL,
    trainable TEXT NOT NULL,
    tensors INTEGER NOT NULL DEFAULT 0,
    params INTEGER NOT NULL DEFAULT 0,
    payload_bytes INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    committed_at REAL
);
CREATE TABLE meta (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT INTO "meta" VALUES('data_version',1);
CREATE TABLE models (
    version INTEGER PRIMARY KEY,
    hash TEXT NOT NULL,
    parent_version INTEGER NOT NULL,
    source TEXT NOT NULL,
    nodes_json TEXT NOT NULL,
    samples INTEGER NOT NULL,
    blob BLOB NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE nodes (
    node_id TEXT PRIMARY KEY,
    latent_dim INTEGER NOT NULL,
    num_classes INTEGER NOT NULL,
    declared_samples INTEGER NOT NULL,
    profile_json TEXT,
    registered_at REAL NOT NULL
);
INSERT INTO "nodes" VALUES('node-a',4,3,6,NULL,1.79614333645859646794e+09);
CREATE TABLE plans (
    round INTEGER PRIMARY KEY,
    plan_json TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE uploads (
    upload_id TEXT PRIMARY KEY,
    node_id TEXT NOT NULL,
    mode TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('open', 'committed', 'superseded')),
    samples INTEGER NOT NULL DEFAULT 0,
    payload_bytes INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    committed_at REAL
);
INSERT INTO "uploads" VALUES('up-1','node-a','replace','committed',6,144,1.7961433364625134468e+09,1.79614333646460461613e+09);
CREATE INDEX uploads_by_node ON uploads (node_id, state);
CREATE INDEX deltas_by_node ON deltas (node_id, state);
DELETE FROM "sqlite_sequence";
COMMIT;
