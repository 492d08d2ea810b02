#!/usr/bin/env node
// A Node.js client of tlm.reward.v1.RewardService built from the repository's protos/ alone.
//
// usage: node score_bad_request.mjs ADDRESS
//
// 1. @grpc/proto-loader loads every .proto under tlm/ (trainer.proto imports
//    google/rpc/status.proto) and google/rpc/error_details.proto with includeDirs = [protos/]
//    and nothing else: the vendored google/rpc files must be there.
// 2. Calls Score with an inline spec whose regex uses a look-behind (RE2 refuses it).
// 3. Decodes the `grpc-status-details-bin` trailer: google.rpc.Status, then each details Any,
//    unpacking google.rpc.BadRequest and google.rpc.ErrorInfo with the types proto-loader loaded.
// 4. Prints ONE JSON line and exits 0:
//      {"loaded": [...], "code": N, "message": "...", "field_violations": [{field, description}],
//       "reasons": [...]}
//    Anything else (the call succeeded, no details trailer) prints {"error": "..."}, exits 1.

import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

import grpc from '@grpc/grpc-js';
import protoLoader from '@grpc/proto-loader';
import protobuf from 'protobufjs';
import descriptor from 'protobufjs/ext/descriptor/index.js';

const PROTOS = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../protos');
const DEADLINE_MS = 10_000;
const BAD_SPEC = { scorers: [{ name: 'r', regex: { pattern: '(?<=a)b' } }] };

function ourProtos(dir, rel = 'tlm') {
  return fs.readdirSync(path.join(dir, rel), { withFileTypes: true }).flatMap((e) => {
    const child = path.posix.join(rel, e.name);
    if (e.isDirectory()) return ourProtos(dir, child);
    return e.name.endsWith('.proto') ? [child] : [];
  });
}

// The message types exactly as proto-loader compiled them: every type definition carries the
// serialized FileDescriptorProtos it was built from; protobufjs turns them into codecs.
function codecs(packageDefinition) {
  const files = new Map();
  for (const def of Object.values(packageDefinition)) {
    for (const bytes of def.fileDescriptorProtos ?? []) {
      const file = descriptor.FileDescriptorProto.decode(bytes);
      files.set(file.name, file);
    }
  }
  return protobuf.Root.fromDescriptor({ file: [...files.values()] });
}

function unpack(root, any) {
  const typeName = any.type_url.slice(any.type_url.lastIndexOf('/') + 1);
  const type = root.lookupType(typeName);
  return [typeName, type.toObject(type.decode(any.value))];
}

function emit(obj, exitCode) {
  process.stdout.write(`${JSON.stringify(obj)}\n`, () => process.exit(exitCode));
}

function main() {
  const address = process.argv[2];
  if (!address) {
    process.stderr.write('usage: node score_bad_request.mjs ADDRESS\n');
    process.exit(2);
  }
  const loaded = [...ourProtos(PROTOS), 'google/rpc/error_details.proto'];
  const packageDefinition = protoLoader.loadSync(loaded, {
    includeDirs: [PROTOS],
    keepCase: true,
    longs: String,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  const tlm = grpc.loadPackageDefinition(packageDefinition).tlm;
  const root = codecs(packageDefinition);
  const Status = root.lookupType('google.rpc.Status');

  const client = new tlm.reward.v1.RewardService(address, grpc.credentials.createInsecure());
  const request = { spec: BAD_SPEC, samples: [{ sample_id: 'a', completion: 'b' }] };
  client.Score(request, { deadline: new Date(Date.now() + DEADLINE_MS) }, (err, response) => {
    client.close();
    if (!err) return emit({ error: `Score succeeded: ${JSON.stringify(response)}` }, 1);
    const [details] = err.metadata?.get('grpc-status-details-bin') ?? [];
    if (!details) return emit({ error: `no grpc-status-details-bin trailer: ${err.message}` }, 1);
    const status = Status.toObject(Status.decode(details), { defaults: true });
    const out = { loaded, code: status.code, message: status.message, field_violations: [], reasons: [] };
    for (const any of status.details) {
      const [typeName, detail] = unpack(root, any);
      if (typeName === 'google.rpc.BadRequest') out.field_violations.push(...detail.field_violations);
      if (typeName === 'google.rpc.ErrorInfo') out.reasons.push(detail.reason);
    }
    return emit(out, 0);
  });
}

main();
