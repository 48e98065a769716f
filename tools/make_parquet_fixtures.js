#!/usr/bin/env node
// Writes the Parquet and Arrow IPC fixtures of tests/unit/test_parquet.cpp and test_arrow_ipc.cpp with real,
// independent writers, and the expected rows beside them:
//
//   DuckDB (@duckdb/node-api)       its own Parquet writer: data pages v1 and v2, dictionary, DELTA_*, codecs
//   arrow-rs (parquet-wasm)         the Rust parquet crate: several row groups and pages, v2 pages, explicit
//                                   DELTA_BINARY_PACKED / DELTA_LENGTH_BYTE_ARRAY / BYTE_STREAM_SPLIT, every codec
//   Arrow JS (apache-arrow)         Arrow IPC stream (as HF `datasets` caches), file ("ARROW1"), legacy stream
//                                   without continuation markers, bodies compressed with zstd / lz4 (frame format,
//                                   by the system `zstd` and `lz4` tools registered as Arrow JS codecs), and
//                                   dictionaries replaced or extended by deltas between batches
//
// Arrow JS 21 writes the *compressed* length in the 8-byte prefix of each compressed buffer, where the format
// (and pyarrow) put the uncompressed length; the reader accepts that signature (src/io/arrow_ipc.cpp).
//
// tests/fixtures/parquet/<dataset>.json holds the expected rows of every fixture of that dataset, in the
// reader's convention (docs/parquet.md): dates as days, timestamps as the stored integer, binary as a string,
// maps as objects. The rows come from the data this script wrote; before anything is saved, every fixture is read
// back by an independent reader (DuckDB for Parquet, Arrow JS for IPC) and must give exactly those rows.
//
// Usage (the writers are not dependencies of the project; install them in a scratch folder):
//   npm install --prefix /tmp/pqgen @duckdb/node-api@1.5.6-r.1 parquet-wasm@0.8.0 apache-arrow@21.2.0
//   NODE_PATH=/tmp/pqgen/node_modules node tools/make_parquet_fixtures.js
'use strict';
const fs = require('fs');
const os = require('os');
const path = require('path');
const { execFileSync } = require('child_process');
const A = require('apache-arrow');
const PW = require('parquet-wasm');
const DUCK = require('@duckdb/node-api');

const OUT = path.join(__dirname, '..', 'tests', 'fixtures', 'parquet');
const MAX_FIXTURE_BYTES = 50 * 1024;

// ---------------------------------------------------------------------------------------------------------
// Deterministic data
function rng(seed) {
  let s = seed >>> 0;
  return () => ((s = (Math.imul(s, 1664525) + 1013904223) >>> 0) / 4294967296);
}
const WORDS = ['the', 'river', 'model', 'token', 'Paris', 'learns', 'quickly', 'under', 'a', 'bright', 'sky',
  'données', 'naïve', 'Größe', '東京', '数据集', 'ключ', 'λόγος', '🙂', 'emoji🚀', 'tab\there', 'quote"s', 'back\\slash'];
function sentence(r, n) {
  const w = [];
  for (let i = 0; i < n; ++i) w.push(WORDS[Math.floor(r() * WORDS.length)]);
  return w.join(' ');
}

// SQuAD as HF `datasets` caches it: answers is struct{text: list<string>, answer_start: list<int32>}.
function squadRows(n) {
  const r = rng(7);
  const titles = ['Normans', 'Computational_complexity_theory', 'Southern_California', 'Sky_(United_Kingdom)'];
  const rows = [];
  for (let i = 0; i < n; ++i) {
    const context = sentence(r, i % 5 === 0 ? 400 : 20 + Math.floor(r() * 40));  // some long paragraphs
    const k = i % 6 === 3 ? 0 : i % 4 === 1 ? 3 : 1;                              // unanswerable ones: empty lists
    const text = [], start = [];
    for (let j = 0; j < k; ++j) {
      text.push(sentence(r, 1 + j));
      start.push(Math.floor(r() * 500));
    }
    rows.push({ id: (0x5733be284776f41dn + BigInt(i)).toString(16), title: titles[i % titles.length], context,
                question: sentence(r, 6) + '?', answers: { text, answer_start: start } });
  }
  return rows;
}

// Chat: messages list<struct{role, content}>, with an empty list, a null list, a null content, long messages.
function chatRows(n) {
  const r = rng(11);
  const rows = [];
  for (let i = 0; i < n; ++i) {
    let messages = [];
    const turns = 1 + (i % 4);
    if (i % 5 !== 0) messages.push({ role: 'system', content: 'You are a helpful assistant.' });
    for (let t = 0; t < turns; ++t) {
      messages.push({ role: 'user', content: sentence(r, 3 + t) });
      messages.push({ role: 'assistant', content: i === 6 && t === 0 ? sentence(r, 900) : sentence(r, 8) });
    }
    if (i === 2) messages = [];
    if (i === 3) messages = null;
    if (i === 4) messages[1].content = null;
    rows.push({ id: i * 1000 + 7, messages, source: i % 3 === 0 ? null : ['gsm8k', 'alpaca'][i % 2] });
  }
  return rows;
}

// Every scalar kind, with nulls. `d` is days since the epoch, `ts` milliseconds.
function typesRows() {
  const u = (a, b, c) => [a, b, c, null, a];
  return [0, 1, 2, 3, 4].map((i) => ({
    b: [true, false, null, true, false][i],
    i8: u(-128, 127, 0)[i],
    i16: u(-32768, 32767, -1)[i],
    i32: u(-2147483648, 2147483647, 42)[i],
    i64: u(-9223372036854775808n, 9223372036854775807n, 123456789012345n)[i],
    u8: u(0, 255, 7)[i],
    u16: u(0, 65535, 300)[i],
    u32: u(0, 4294967295, 3000000000)[i],
    u64: u(0n, 18446744073709551615n, 10000000000000000000n)[i],
    f16: u(1.5, -0.25, 65504)[i],
    f32: u(1.5, -2.25, 1024.125)[i],
    f64: u(0.1, -1e300, 2.5)[i],
    s: u('plain', 'ünïcödé 🙂', '')[i],
    ls: u('large', '', 'x'.repeat(300))[i],
    bin: u('AB', '', 'raw bytes')[i],
    d: u(0, 19000, -365)[i],
    ts: u(0, 1700000000123, -1000)[i],
    li: [[1, 2, 3], [], null, [null, 5], [-1]][i],
    fsl: [[1.5, 2], [0, -1], null, [3, 4], [5, 6]][i],
    st: [{ a: 1, b: 'x' }, { a: null, b: 'y' }, null, { a: 4, b: null }, { a: 5, b: 'z' }][i],
    nul: null,
    dict: ['red', 'green', null, 'red', 'blue'][i],
    map: [{ k1: 1, k2: 2 }, {}, null, { only: null }, { z: 26 }][i],
  }));
}

// ---------------------------------------------------------------------------------------------------------
// Arrow schemas: each column's Arrow type and how a row value becomes an Arrow JS input value.
const F = (name, type, nullable = true) => new A.Field(name, type, nullable);
const id = (v) => v;
const toMap = (o) => (o == null ? null : new Map(Object.entries(o)));
const toBytes = (s) => (s == null ? null : Uint8Array.from(Buffer.from(s, 'latin1')));
const toDate = (d) => (d == null ? null : new Date(d * 86400000));

const SQUAD_COLS = [
  ['id', new A.Utf8], ['title', new A.Utf8], ['context', new A.Utf8], ['question', new A.Utf8],
  ['answers', new A.Struct([F('text', new A.List(F('item', new A.Utf8))),
                            F('answer_start', new A.List(F('item', new A.Int32)))])],
];
const CHAT_COLS = [
  ['id', new A.Int64, (v) => BigInt(v)],
  ['messages', new A.List(F('item', new A.Struct([F('role', new A.Utf8), F('content', new A.Utf8)])))],
  ['source', new A.Dictionary(new A.Utf8, new A.Int32)],
];
const TYPES_COLS = [
  ['b', new A.Bool], ['i8', new A.Int8], ['i16', new A.Int16], ['i32', new A.Int32], ['i64', new A.Int64],
  ['u8', new A.Uint8], ['u16', new A.Uint16], ['u32', new A.Uint32], ['u64', new A.Uint64],
  ['f16', new A.Float16], ['f32', new A.Float32], ['f64', new A.Float64], ['s', new A.Utf8],
  ['ls', new A.LargeUtf8], ['bin', new A.Binary, toBytes], ['d', new A.DateDay, toDate],
  ['ts', new A.TimestampMillisecond], ['li', new A.List(F('item', new A.Int32))],
  ['fsl', new A.FixedSizeList(2, F('item', new A.Float32))],
  ['st', new A.Struct([F('a', new A.Int32), F('b', new A.Utf8)])], ['nul', new A.Null],
  ['dict', new A.Dictionary(new A.Utf8, new A.Int32)],
  ['map', new A.Map_(F('entries', new A.Struct([F('key', new A.Utf8, false), F('value', new A.Int32)]), false)), toMap],
];

// A dictionary column whose dictionary grows between batches while sharing its first chunk: Arrow JS then writes
// delta dictionary batches (isDelta) after the first one.
function deltaDictionaryTable() {
  const type = new A.Dictionary(new A.Utf8, new A.Int32, 0);
  const chunk = (values) => A.vectorFromArray(values, new A.Utf8).data[0];
  const c1 = chunk(['alpha', 'beta']), c2 = chunk(['gamma']), c3 = chunk(['delta', 'épsilon']);
  const schema = new A.Schema([F('tag', type)]);
  const batch = (idx, chunks) => {
    const d = A.makeData({ type, length: idx.length, nullCount: 0, data: Int32Array.from(idx), dictionary: new A.Vector(chunks) });
    return new A.RecordBatch(schema, A.makeData({ type: new A.Struct(schema.fields), length: idx.length, nullCount: 0, children: [d] }));
  };
  const rows = ['alpha', 'beta', 'beta', 'gamma', 'alpha', 'épsilon', 'delta', 'gamma'].map((tag) => ({ tag }));
  return [new A.Table(schema, [batch([0, 1, 1], [c1]), batch([2, 0], [c1, c2]), batch([4, 3, 2], [c1, c2, c3])]), rows];
}

function arrowTable(cols, rows, batchRows = rows.length, metadata = new Map()) {
  const schema = new A.Schema(cols.map(([name, type]) => F(name, type)), metadata);
  const batches = [];
  for (let b = 0; b < rows.length; b += batchRows) {
    const part = rows.slice(b, b + batchRows);
    const vecs = {};
    for (const [name, type, conv = id] of cols) vecs[name] = A.vectorFromArray(part.map((r) => conv(r[name])), type);
    batches.push(...new A.Table(vecs).batches.map((x) => new A.RecordBatch(schema, x.data)));
  }
  return new A.Table(schema, batches);
}

// Arrow JS value -> the reader's JSON convention (used to check what Arrow JS reads back).
function normArrow(v, type) {
  if (v == null) return null;
  switch (type.typeId) {
    case A.Type.Dictionary: return normArrow(v, type.dictionary);
    case A.Type.Date: return v / 86400000;
    case A.Type.Binary: return Buffer.from(v).toString('latin1');
    case A.Type.List: case A.Type.FixedSizeList: case A.Type.LargeList:
      return Array.from(v, (x) => normArrow(x, type.children[0].type));
    case A.Type.Struct: {
      const o = {};
      for (const c of type.children) o[c.name] = normArrow(v[c.name], c.type);
      return o;
    }
    case A.Type.Map: {
      const o = {};
      const vt = type.children[0].type.children[1].type;
      for (const [k, x] of v) o[String(k)] = normArrow(x, vt);
      return o;
    }
    default: return v;
  }
}

// ---------------------------------------------------------------------------------------------------------
// JSON with exact 64-bit integers (BigInt in, bare digits out) and a canonical form to compare rows.
function stringify(v) {
  return JSON.stringify(v, (k, x) => (typeof x === 'bigint' ? `@@int:${x}` : x)).replace(/"@@int:(-?\d+)"/g, '$1');
}
function parseExact(text) {  // integers beyond 2^53 stay exact (DuckDB prints them bare)
  return JSON.parse(text.replace(/([:,[])(-?\d{16,})(?=[,\]}])/g, '$1"@@int:$2"'),
                    (k, x) => (typeof x === 'string' && x.startsWith('@@int:') ? BigInt(x.slice(6)) : x));
}
function canon(v) {
  if (typeof v === 'bigint' || (typeof v === 'number' && Number.isInteger(v))) return `int:${BigInt(v)}`;
  if (Array.isArray(v)) return v.map(canon);
  if (v && typeof v === 'object') return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, canon(x)]));
  return v;
}
function assertSame(name, got, want) {
  const g = JSON.stringify(canon(got)), w = JSON.stringify(canon(want));
  if (g === w) return;
  for (let i = 0; i < Math.max(got.length, want.length); ++i) {
    if (JSON.stringify(canon(got[i])) !== JSON.stringify(canon(want[i])))
      throw new Error(`${name}: row ${i} read back as\n  ${stringify(got[i])}\nexpected\n  ${stringify(want[i])}`);
  }
  throw new Error(`${name}: rows differ`);
}

function writeFixture(name, bytes) {
  if (bytes.length > MAX_FIXTURE_BYTES) throw new Error(`${name}: ${bytes.length} bytes, over the fixture limit`);
  fs.writeFileSync(path.join(OUT, name), bytes);
  console.log(`${name}: ${bytes.length} bytes`);
}
function writeExpected(dataset, rows) {
  const text = '[\n' + rows.map(stringify).join(',\n') + '\n]\n';
  if (text.length > MAX_FIXTURE_BYTES) throw new Error(`${dataset}.json over the fixture limit`);
  fs.writeFileSync(path.join(OUT, `${dataset}.json`), text);
}

// ---------------------------------------------------------------------------------------------------------
// DuckDB: writes Parquet from SQL literals and reads every fixture back.
const sqlStr = (s) => `'${s.replace(/'/g, "''")}'`;
function sqlLit(v, kind) {
  if (v == null) return 'NULL';
  if (kind === 'str' || kind === 'blob' || kind === 'uuid') return sqlStr(v);
  if (kind === 'date') return `DATE '1970-01-01' + ${v}`;
  if (kind === 'ts_us') return `make_timestamp(${v})`;
  if (Array.isArray(kind)) return `[${v.map((x) => sqlLit(x, kind[0])).join(', ')}]`;
  if (kind && typeof kind === 'object') {
    if (kind.map) return `MAP {${Object.entries(v).map(([k, x]) => `${sqlStr(k)}: ${sqlLit(x, kind.map)}`).join(', ')}}`;
    return `{${Object.entries(kind).map(([k, t]) => `${sqlStr(k)}: ${sqlLit(v[k], t)}`).join(', ')}}`;
  }
  return String(v);  // numbers, BigInt, booleans
}

class Duck {
  static async open() {
    const d = new Duck();
    d.db = await DUCK.DuckDBInstance.create(':memory:');
    d.con = await d.db.connect();
    await d.con.run('SET threads = 1');  // keeps row order and chunking deterministic
    return d;
  }
  // cols: [name, SQL type, literal kind]; parts: row counts per row group (DuckDB flushes a row group per
  // UNION ALL branch when ROW_GROUP_SIZE is smaller than a branch).
  async write(file, cols, rows, options, parts = [rows.length]) {
    await this.con.run('DROP TABLE IF EXISTS t');
    await this.con.run(`CREATE TABLE t (k INTEGER, ${cols.map(([n, t]) => `"${n}" ${t}`).join(', ')})`);
    const values = rows.map((r, i) => `(${i}, ${cols.map(([n, , kind]) => sqlLit(r[n], kind)).join(', ')})`);
    await this.con.run(`INSERT INTO t VALUES ${values.join(', ')}`);
    const names = cols.map(([n]) => `"${n}"`).join(', ');
    const branches = [];
    let start = 0;
    for (const n of parts) {
      branches.push(`SELECT ${names} FROM (SELECT * FROM t WHERE k >= ${start} AND k < ${start + n} ORDER BY k)`);
      start += n;
    }
    await this.con.run(`COPY (${branches.join(' UNION ALL ')}) TO '${file}' (FORMAT parquet, ROW_GROUP_SIZE 1, ${options})`);
  }
  // The rows of a Parquet file as DuckDB reads them, with `conv` SQL expressions per column (to the convention).
  async readBack(file, conv = {}) {
    const cols = (await this.con.runAndReadAll(`DESCRIBE SELECT * FROM read_parquet('${file}')`)).getRowObjectsJson();
    const sel = cols.map((c) => (conv[c.column_name] ? `${conv[c.column_name]} AS "${c.column_name}"` : `"${c.column_name}"`));
    const json = path.join(os.tmpdir(), `pqgen_${process.pid}.json`);
    await this.con.run(`COPY (SELECT ${sel.join(', ')} FROM read_parquet('${file}')) TO '${json}' (FORMAT json)`);
    const lines = fs.readFileSync(json, 'utf8').split('\n').filter((l) => l.trim());
    fs.unlinkSync(json);
    return lines.map(parseExact);
  }
  async meta(file) {
    return (await this.con.runAndReadAll(
      `SELECT row_group_id, path_in_schema, compression, encodings FROM parquet_metadata('${file}')`)).getRowObjectsJson();
  }
}

// ---------------------------------------------------------------------------------------------------------
function parquetWasm(table, configure) {
  const wt = PW.Table.fromIPCStream(A.tableToIPC(table, 'stream'));
  return Buffer.from(PW.writeParquet(wt, configure(new PW.WriterPropertiesBuilder()).build()));
}

function registerCodecs() {
  const tool = (cmd, args) => (data) => new Uint8Array(execFileSync(cmd, args, { input: Buffer.from(data) }));
  A.compressionRegistry.set(A.CompressionType.ZSTD, { encode: tool('zstd', ['-q', '-c', '-3']) });
  A.compressionRegistry.set(A.CompressionType.LZ4_FRAME, { encode: tool('lz4', ['-q', '-c']) });
}

async function main() {
  fs.mkdirSync(OUT, { recursive: true });
  const duck = await Duck.open();
  const squad = squadRows(22), chat = chatRows(13), types = typesRows();
  const DATASETS = { squad, chat, types };
  const checks = [];  // [fixture, dataset, read-back conversions]

  // ---- arrow-rs (parquet-wasm)
  const squadT = arrowTable(SQUAD_COLS, squad), chatT = arrowTable(CHAT_COLS, chat);
  const typesT = arrowTable(TYPES_COLS, types);
  // SNAPPY, dictionary pages, row groups of 5 rows, pages of ~256 bytes written 2 rows at a time.
  writeFixture('squad_arrowrs_snappy.parquet', parquetWasm(squadT, (b) => b.setCompression(PW.Compression.SNAPPY)
    .setMaxRowGroupSize(5).setDataPageSizeLimit(256).setWriteBatchSize(2)));
  for (const [codec, name] of [['UNCOMPRESSED', 'none'], ['GZIP', 'gzip'], ['ZSTD', 'zstd'], ['BROTLI', 'brotli'],
                               ['LZ4_RAW', 'lz4raw']])
    writeFixture(`squad_arrowrs_${name}.parquet`, parquetWasm(squadT, (b) => b.setCompression(PW.Compression[codec])
      .setMaxRowGroupSize(8)));
  // Data pages v2 without dictionaries: arrow-rs falls back to DELTA_BINARY_PACKED, DELTA_BYTE_ARRAY, RLE booleans.
  writeFixture('chat_arrowrs_v2_zstd.parquet', parquetWasm(chatT, (b) => b.setCompression(PW.Compression.ZSTD)
    .setWriterVersion(PW.WriterVersion.V2).setDictionaryEnabled(false).setMaxRowGroupSize(4)
    .setDataPageSizeLimit(512).setWriteBatchSize(3)));
  writeFixture('types_arrowrs_v2.parquet', parquetWasm(typesT, (b) => b.setCompression(PW.Compression.ZSTD)
    .setWriterVersion(PW.WriterVersion.V2).setDictionaryEnabled(false).setMaxRowGroupSize(3)));
  // Explicit encodings on a v1 file: BYTE_STREAM_SPLIT floats, DELTA_LENGTH_BYTE_ARRAY strings, DELTA ints.
  writeFixture('types_arrowrs_encodings.parquet', parquetWasm(typesT, (b) => b.setCompression(PW.Compression.SNAPPY)
    .setDictionaryEnabled(false).setColumnEncoding('f32', PW.Encoding.BYTE_STREAM_SPLIT)
    .setColumnEncoding('f64', PW.Encoding.BYTE_STREAM_SPLIT).setColumnEncoding('s', PW.Encoding.DELTA_LENGTH_BYTE_ARRAY)
    .setColumnEncoding('ls', PW.Encoding.DELTA_BYTE_ARRAY).setColumnEncoding('i32', PW.Encoding.DELTA_BINARY_PACKED)
    .setColumnEncoding('i64', PW.Encoding.DELTA_BINARY_PACKED).setColumnEncoding('u64', PW.Encoding.DELTA_BINARY_PACKED)));
  const arrowrsTypesConv = { d: `("d" - DATE '1970-01-01')`, ts: 'epoch_ms("ts")', bin: 'CAST("bin" AS VARCHAR)',
                             f16: 'CAST("f16" AS DOUBLE)' };
  for (const f of ['squad_arrowrs_snappy', 'squad_arrowrs_none', 'squad_arrowrs_gzip', 'squad_arrowrs_zstd',
                   'squad_arrowrs_brotli', 'squad_arrowrs_lz4raw'])
    checks.push([`${f}.parquet`, 'squad']);
  checks.push(['chat_arrowrs_v2_zstd.parquet', 'chat']);
  checks.push(['types_arrowrs_v2.parquet', 'types', arrowrsTypesConv]);
  checks.push(['types_arrowrs_encodings.parquet', 'types', arrowrsTypesConv]);

  // ---- DuckDB
  const SQUAD_SQL = [['id', 'VARCHAR', 'str'], ['title', 'VARCHAR', 'str'], ['context', 'VARCHAR', 'str'],
    ['question', 'VARCHAR', 'str'],
    ['answers', 'STRUCT(text VARCHAR[], answer_start INTEGER[])', { text: ['str'], answer_start: ['int'] }]];
  const CHAT_SQL = [['id', 'BIGINT'], ['messages', 'STRUCT(role VARCHAR, content VARCHAR)[]', [{ role: 'str', content: 'str' }]],
    ['source', 'VARCHAR', 'str']];
  const duckTypes = types.map((r, i) => ({ ...r, ts: r.ts == null ? null : r.ts * 1000,
    uuid: [null, '00112233-4455-6677-8899-aabbccddeeff', 'ffffffff-0000-0000-0000-000000000001', null, null][i] }));
  const TYPES_SQL = [['b', 'BOOLEAN'], ['i8', 'TINYINT'], ['i16', 'SMALLINT'], ['i32', 'INTEGER'], ['i64', 'BIGINT'],
    ['u8', 'UTINYINT'], ['u16', 'USMALLINT'], ['u32', 'UINTEGER'], ['u64', 'UBIGINT'], ['f32', 'FLOAT'],
    ['f64', 'DOUBLE'], ['s', 'VARCHAR', 'str'], ['bin', 'BLOB', 'blob'], ['d', 'DATE', 'date'],
    ['ts', 'TIMESTAMP', 'ts_us'], ['uuid', 'UUID', 'uuid'], ['li', 'INTEGER[]', ['int']],
    ['st', 'STRUCT(a INTEGER, b VARCHAR)', { a: 'int', b: 'str' }],
    ['map', 'MAP(VARCHAR, INTEGER)', { map: 'int' }]];
  const duckTypesRows = duckTypes.map((r) => Object.fromEntries(TYPES_SQL.map(([n]) => [n, r[n]])));
  DATASETS.types_duckdb = duckTypesRows;
  const tmp = (f) => path.join(OUT, f);
  await duck.write(tmp('squad_duckdb_v1_snappy.parquet'), SQUAD_SQL, squad, 'COMPRESSION snappy', [9, 9, 4]);
  await duck.write(tmp('squad_duckdb_v2_gzip.parquet'), SQUAD_SQL, squad, "COMPRESSION gzip, PARQUET_VERSION v2", [11, 11]);
  await duck.write(tmp('chat_duckdb_v1_zstd.parquet'), CHAT_SQL, chat, 'COMPRESSION zstd', [5, 5, 3]);
  await duck.write(tmp('chat_duckdb_v2_uncompressed.parquet'), CHAT_SQL, chat, "COMPRESSION uncompressed, PARQUET_VERSION v2");
  await duck.write(tmp('types_duckdb_v1_brotli.parquet'), TYPES_SQL, duckTypesRows, 'COMPRESSION brotli', [2, 3]);
  await duck.write(tmp('types_duckdb_v2_lz4.parquet'), TYPES_SQL, duckTypesRows, "COMPRESSION lz4_raw, PARQUET_VERSION v2");
  // A DECIMAL column (refused, naming the column) beside an INT32 one (still readable).
  await duck.write(tmp('decimal_duckdb.parquet'), [['n', 'INTEGER'], ['price', 'DECIMAL(9,2)']],
                   [{ n: 1, price: 1.25 }, { n: 2, price: null }], 'COMPRESSION snappy');
  DATASETS.decimal = [{ n: 1, price: 1.25 }, { n: 2, price: null }];
  const duckTypesConv = { d: `("d" - DATE '1970-01-01')`, ts: 'epoch_us("ts")', bin: 'CAST("bin" AS VARCHAR)',
                          uuid: 'CAST("uuid" AS VARCHAR)' };
  for (const f of ['squad_duckdb_v1_snappy', 'squad_duckdb_v2_gzip']) checks.push([`${f}.parquet`, 'squad']);
  for (const f of ['chat_duckdb_v1_zstd', 'chat_duckdb_v2_uncompressed']) checks.push([`${f}.parquet`, 'chat']);
  for (const f of ['types_duckdb_v1_brotli', 'types_duckdb_v2_lz4'])
    checks.push([`${f}.parquet`, 'types_duckdb', duckTypesConv]);
  checks.push(['decimal_duckdb.parquet', 'decimal', { price: 'CAST("price" AS DOUBLE)' }]);

  // ---- Arrow IPC (Arrow JS)
  registerCodecs();
  const hfMeta = new Map([['huggingface', '{"info": {"features": {"id": {"dtype": "string", "_type": "Value"}}}}']]);
  const squadIpc = arrowTable(SQUAD_COLS, squad, 5, hfMeta), chatIpc = arrowTable(CHAT_COLS, chat, 4);
  const typesIpc = arrowTable(TYPES_COLS, types, 2);  // a new dictionary per batch: replacements
  const ipc = (table, opts) => Buffer.from(A.RecordBatchStreamWriter.writeAll(table, opts).toUint8Array(true));
  writeFixture('squad_stream.arrow', Buffer.from(A.tableToIPC(squadIpc, 'stream')));
  writeFixture('squad_file.arrow', Buffer.from(A.tableToIPC(squadIpc, 'file')));
  writeFixture('squad_stream_zstd.arrow', Buffer.from(A.tableToIPC(squadIpc, 'stream', A.CompressionType.ZSTD)));
  writeFixture('chat_stream.arrow', Buffer.from(A.tableToIPC(chatIpc, 'stream')));
  writeFixture('chat_stream_lz4.arrow', Buffer.from(A.tableToIPC(chatIpc, 'stream', A.CompressionType.LZ4_FRAME)));
  writeFixture('chat_legacy.arrow', ipc(chatIpc, { writeLegacyIpcFormat: true }));
  writeFixture('types_file.arrow', Buffer.from(A.tableToIPC(arrowTable(TYPES_COLS, types), 'file')));
  writeFixture('types_stream.arrow', Buffer.from(A.tableToIPC(typesIpc, 'stream')));
  const [deltaT, deltaRows] = deltaDictionaryTable();
  DATASETS.dict_delta = deltaRows;
  writeFixture('dict_delta_stream.arrow', Buffer.from(A.tableToIPC(deltaT, 'stream')));
  writeFixture('dict_delta_file.arrow', Buffer.from(A.tableToIPC(deltaT, 'file')));
  const ipcChecks = [['squad_stream.arrow', 'squad'], ['squad_file.arrow', 'squad'], ['squad_stream_zstd.arrow', 'squad'],
    ['chat_stream.arrow', 'chat'], ['chat_stream_lz4.arrow', 'chat'], ['chat_legacy.arrow', 'chat'],
    ['types_file.arrow', 'types'], ['types_stream.arrow', 'types'], ['dict_delta_stream.arrow', 'dict_delta'],
    ['dict_delta_file.arrow', 'dict_delta']];

  // ---- read everything back with the independent readers before saving the expected rows
  for (const [file, dataset, conv] of checks)
    assertSame(file, await duck.readBack(tmp(file), conv), DATASETS[dataset]);
  A.compressionRegistry.set(A.CompressionType.ZSTD, { decode: (d) => new Uint8Array(execFileSync('zstd', ['-q', '-d', '-c'], { input: Buffer.from(d) })) });
  A.compressionRegistry.set(A.CompressionType.LZ4_FRAME, { decode: (d) => new Uint8Array(execFileSync('lz4', ['-q', '-d', '-c'], { input: Buffer.from(d) })) });
  for (const [file, dataset] of ipcChecks) {
    const t = A.tableFromIPC(fs.readFileSync(tmp(file)));
    const rows = t.toArray().map((r) => Object.fromEntries(t.schema.fields.map((f) => [f.name, normArrow(r[f.name], f.type)])));
    assertSame(file, rows, DATASETS[dataset]);
  }
  for (const [name, rows] of Object.entries(DATASETS)) writeExpected(name, rows);
  for (const f of ['squad_arrowrs_snappy.parquet', 'chat_arrowrs_v2_zstd.parquet', 'types_arrowrs_encodings.parquet',
                   'squad_duckdb_v2_gzip.parquet', 'types_duckdb_v2_lz4.parquet'])
    console.log(f, JSON.stringify(await duck.meta(tmp(f))));
}

main().catch((e) => {
  console.error(e.stack || e);
  process.exit(1);
});
