#!/usr/bin/env node
// Language-neutral smoke probe for TLM gRPC services.
//
// usage: node probe.mjs ADDRESS [--api-key KEY] [--service NAME ...]
//
// 1. grpc.health.v1.Health/Check for "" and for every --service NAME.
// 2. grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo (one bidi
//    stream): list_services, then file_containing_symbol for every listed
//    service, checking that a FileDescriptorProto declaring it comes back.
// 3. Prints ONE JSON line on stdout and exits 0:
//      {"health": {...}, "services": [...], "descriptors": {"name": bytes}}
//    On any gRPC error prints {"error": {"code": N, "details": "..."}} and
//    exits 1. Bad command-line usage exits 2 (message on stderr).
//
// Only insecure (plaintext) channels; every call has a 10 s deadline. With
// --api-key KEY every call carries metadata "authorization: Bearer KEY".

import path from 'node:path';
import { fileURLToPath } from 'node:url';

import grpc from '@grpc/grpc-js';
import protoLoader from '@grpc/proto-loader';

const DEADLINE_MS = 10_000;
const PROTO_DIR = path.join(path.dirname(fileURLToPath(import.meta.url)), 'protos');
const USAGE = 'usage: node probe.mjs ADDRESS [--api-key KEY] [--service NAME ...]';

// grpc.status.UNKNOWN: used for failures that are not a gRPC status, e.g. a
// reflection answer that does not contain the expected descriptor.
const UNKNOWN = grpc.status.UNKNOWN;

class ProbeError extends Error {
  constructor(code, details) {
    super(details);
    this.code = code;
    this.details = details;
  }
}

function parseArgs(argv) {
  let address = null;
  let apiKey = null;
  const services = [];
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    const takeValue = (flag) => {
      if (arg.startsWith(`${flag}=`)) return arg.slice(flag.length + 1);
      if (i + 1 >= argv.length) throw new Error(`${flag} needs a value`);
      return argv[++i];
    };
    if (arg === '-h' || arg === '--help') {
      process.stdout.write(`${USAGE}\n`);
      process.exit(0);
    } else if (arg === '--api-key' || arg.startsWith('--api-key=')) {
      apiKey = takeValue('--api-key');
    } else if (arg === '--service' || arg.startsWith('--service=')) {
      services.push(takeValue('--service'));
    } else if (arg.startsWith('-')) {
      throw new Error(`unknown option ${arg}`);
    } else if (address === null) {
      address = arg;
    } else {
      throw new Error(`unexpected argument ${arg}`);
    }
  }
  if (!address) throw new Error('ADDRESS is required');
  return { address, apiKey, services: [...new Set(services)] };
}

function loadProto(relPath) {
  const def = protoLoader.loadSync(relPath, {
    includeDirs: [PROTO_DIR],
    keepCase: true, // snake_case field names, as on the wire definition
    enums: String, // HealthCheckResponse.status -> "SERVING"
    longs: String,
    defaults: true,
    oneofs: true, // virtual field naming the set member of each oneof
  });
  return grpc.loadPackageDefinition(def);
}

function deadline() {
  return new Date(Date.now() + DEADLINE_MS);
}

function toProbeError(err) {
  if (err instanceof ProbeError) return err;
  if (err && typeof err.code === 'number') {
    return new ProbeError(err.code, err.details ?? err.message ?? String(err));
  }
  return new ProbeError(UNKNOWN, err?.message ?? String(err));
}

// ---------------------------------------------------------------------------
// Health

function healthCheck(client, metadata, service) {
  return new Promise((resolve, reject) => {
    client.Check({ service }, metadata, { deadline: deadline() }, (err, resp) => {
      if (err) reject(toProbeError(err));
      else resolve(resp.status);
    });
  });
}

// ---------------------------------------------------------------------------
// Minimal protobuf wire reader, enough to pull name / package / service names
// out of a serialized google.protobuf.FileDescriptorProto:
//   1: name (string), 2: package (string), 6: service (ServiceDescriptorProto,
//   whose field 1 is its name).

function readVarint(buf, pos) {
  let value = 0;
  let shift = 0;
  for (;;) {
    if (pos >= buf.length) throw new Error('truncated varint');
    const byte = buf[pos++];
    value += (byte & 0x7f) * 2 ** shift;
    if ((byte & 0x80) === 0) return [value, pos];
    shift += 7;
    if (shift > 63) throw new Error('varint too long');
  }
}

function* fields(buf) {
  let pos = 0;
  while (pos < buf.length) {
    let key;
    [key, pos] = readVarint(buf, pos);
    const fieldNo = Math.floor(key / 8);
    const wireType = key & 7;
    if (fieldNo === 0) throw new Error('field number 0');
    switch (wireType) {
      case 0: {
        [, pos] = readVarint(buf, pos);
        break;
      }
      case 1:
        pos += 8;
        break;
      case 2: {
        let len;
        [len, pos] = readVarint(buf, pos);
        if (pos + len > buf.length) throw new Error('truncated length-delimited field');
        yield [fieldNo, buf.subarray(pos, pos + len)];
        pos += len;
        break;
      }
      case 5:
        pos += 4;
        break;
      default:
        throw new Error(`unsupported wire type ${wireType}`);
    }
    if (pos > buf.length) throw new Error('truncated field');
  }
}

function parseFileDescriptor(buf) {
  const fd = { name: '', package: '', services: [] };
  for (const [no, bytes] of fields(buf)) {
    if (no === 1) fd.name = bytes.toString('utf8');
    else if (no === 2) fd.package = bytes.toString('utf8');
    else if (no === 6) {
      for (const [sno, sbytes] of fields(bytes)) {
        if (sno === 1) fd.services.push(sbytes.toString('utf8'));
      }
    }
  }
  if (!fd.name) throw new Error('FileDescriptorProto without a name');
  return fd;
}

// ---------------------------------------------------------------------------
// Reflection (one bidi stream, requests answered in order)

function openReflection(client, metadata) {
  const call = client.ServerReflectionInfo(metadata, { deadline: deadline() });
  const queue = []; // responses not yet consumed
  const waiters = []; // pending next() promises
  let failure = null;
  let ended = false;

  const settle = () => {
    while (waiters.length) {
      const w = waiters[0];
      if (queue.length) w.resolve(queue.shift());
      else if (failure) w.reject(failure);
      else if (ended) w.reject(new ProbeError(UNKNOWN, 'reflection stream ended before a response'));
      else return;
      waiters.shift();
    }
  };
  call.on('data', (msg) => {
    queue.push(msg);
    settle();
  });
  call.on('error', (err) => {
    failure = toProbeError(err);
    settle();
  });
  call.on('end', () => {
    ended = true;
    settle();
  });

  return {
    async request(req) {
      if (failure) throw failure;
      call.write(req);
      const resp = await new Promise((resolve, reject) => {
        waiters.push({ resolve, reject });
        settle();
      });
      if (resp.message_response === 'error_response') {
        const e = resp.error_response;
        throw new ProbeError(e.error_code || UNKNOWN, e.error_message || 'reflection error_response');
      }
      return resp;
    },
    // Half-close and wait for the server to finish with an OK status.
    finish() {
      return new Promise((resolve, reject) => {
        if (failure) return reject(failure);
        call.on('status', (st) => {
          if (st.code === grpc.status.OK) resolve();
          else reject(new ProbeError(st.code, st.details));
        });
        call.on('error', (err) => reject(toProbeError(err)));
        call.end();
      });
    },
    cancel() {
      call.cancel();
    },
  };
}

async function probeReflection(client, metadata) {
  const stream = openReflection(client, metadata);
  try {
    const listResp = await stream.request({ list_services: '' });
    if (listResp.message_response !== 'list_services_response') {
      throw new ProbeError(UNKNOWN, `list_services answered with ${listResp.message_response}`);
    }
    const services = [...new Set(listResp.list_services_response.service.map((s) => s.name))].sort();

    const descriptors = {};
    const seen = new Map(); // file name -> parsed descriptor, across the stream
    for (const name of services) {
      const resp = await stream.request({ file_containing_symbol: name });
      if (resp.message_response !== 'file_descriptor_response') {
        throw new ProbeError(UNKNOWN, `file_containing_symbol ${name} answered with ${resp.message_response}`);
      }
      const blobs = resp.file_descriptor_response.file_descriptor_proto;
      let bytes = 0;
      for (const blob of blobs) {
        bytes += blob.length;
        let fd;
        try {
          fd = parseFileDescriptor(blob);
        } catch (e) {
          throw new ProbeError(UNKNOWN, `bad FileDescriptorProto for ${name}: ${e.message}`);
        }
        seen.set(fd.name, fd);
      }
      // The server may skip files it already sent on this stream, so look in
      // everything received so far for the file that declares the service.
      const declared = [...seen.values()].some((fd) =>
        fd.services.some((s) => (fd.package ? `${fd.package}.${s}` : s) === name),
      );
      if (!declared) {
        throw new ProbeError(UNKNOWN, `no FileDescriptorProto declaring ${name} came back (${blobs.length} files)`);
      }
      descriptors[name] = bytes;
    }
    await stream.finish();
    return { services, descriptors };
  } catch (err) {
    stream.cancel();
    throw err;
  }
}

// ---------------------------------------------------------------------------

function emit(obj, exitCode) {
  process.stdout.write(`${JSON.stringify(obj)}\n`, () => process.exit(exitCode));
}

async function main() {
  let args;
  try {
    args = parseArgs(process.argv.slice(2));
  } catch (e) {
    process.stderr.write(`probe: ${e.message}\n${USAGE}\n`);
    process.exit(2);
  }

  const healthPkg = loadProto('grpc/health/v1/health.proto');
  const reflPkg = loadProto('grpc/reflection/v1alpha/reflection.proto');
  const creds = grpc.credentials.createInsecure();
  const health = new healthPkg.grpc.health.v1.Health(args.address, creds);
  // Same target + options => grpc-js shares the underlying subchannel.
  const reflection = new reflPkg.grpc.reflection.v1alpha.ServerReflection(args.address, creds);

  const metadata = new grpc.Metadata();
  if (args.apiKey !== null) metadata.set('authorization', `Bearer ${args.apiKey}`);

  try {
    const healthResult = {};
    for (const service of ['', ...args.services.filter((s) => s !== '')]) {
      healthResult[service] = await healthCheck(health, metadata, service);
    }
    const { services, descriptors } = await probeReflection(reflection, metadata);
    emit({ health: healthResult, services, descriptors }, 0);
  } catch (err) {
    const e = toProbeError(err);
    emit({ error: { code: e.code, details: e.details } }, 1);
  } finally {
    health.close();
    reflection.close();
  }
}

main();
