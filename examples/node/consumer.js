// A backchannel consumer in Node.js, written from docs/protocol.md and envelope.proto alone:
// it adds a listener to the seed's CallbackService (examples/callback/provider.py), answers
// the provider's callbacks, removes the listener and ends the stream.
//
//   node consumer.js HOST:PORT [--count N]
//
// The comments name the section of docs/protocol.md ("§") each part follows.
'use strict';

const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const definition = protoLoader.loadSync('backchannel/v1/envelope.proto', {
  includeDirs: [path.join(__dirname, '..', '..', 'protos')],
  longs: String, // §16 Values: 64-bit ids and ints as decimal strings, exact beyond 2^53
  enums: String, // Code as its name ("NOT_FOUND")
  defaults: false,
  oneofs: true, // frame.kind, value.kind: the name of the member that is set
});
const { Envelope } = grpc.loadPackageDefinition(definition).backchannel.v1;

const SERVICE = 'com.callback.CallbackService';
// the listener interface: its name, and the only methods the provider may call (§8)
const LISTENER = { name: 'com.callback.CallbackListener', methods: new Set(['changed']) };

function main() {
  const address = process.argv[2];
  const countAt = process.argv.indexOf('--count');
  const wanted = countAt > 0 ? Number(process.argv[countAt + 1]) : 3;
  if (!address) {
    console.error('usage: node consumer.js HOST:PORT [--count N]');
    process.exit(2);
  }
  const client = new Envelope(address, grpc.credentials.createInsecure(), {
    'grpc.keepalive_time_ms': 10000, // §14 Keepalive: a vanished provider is noticed
    'grpc.keepalive_timeout_ms': 5000,
  });
  const stream = client.Connect(); // §2: one bidirectional stream per consumer
  const consumer = new Consumer(stream);
  const giveUp = setTimeout(() => consumer.fail('no clean end within 30 s'), 30000);

  stream.on('data', (frame) => consumer.receive(frame));
  stream.on('error', () => {}); // said by the 'status' event, which always follows
  stream.on('status', (status) => {
    // §10 The end of a stream: the provider ends it with OK once this side half-closed;
    // after a GoAway, however the provider ends it (a stopping provider may not wait)
    clearTimeout(giveUp);
    console.log(`stream ended: ${grpc.status[status.code]}`);
    client.close();
    const clean = consumer.done && (status.code === grpc.status.OK || consumer.goingAway);
    process.exitCode = clean ? 0 : 1;
  });

  // §5 Handshake: the consumer's first frame is a Hello
  stream.write({
    hello: { protocolVersion: 1, application: 'node-consumer', maxCallsInFlight: 100 },
  });
  consumer.welcome.then(async (welcome) => {
    const names = welcome.services.map((service) => service.name).join(', ');
    console.log(`welcome from ${welcome.application} (protocol ${welcome.protocolVersion}): ${names}`);
    // §15 Errors: an unknown method is UNIMPLEMENTED, backchannel.MethodNotFound
    await consumer.call('noSuchMethod', [])
      .catch((error) => console.log(`noSuchMethod failed: ${error.message}`));
    // §5 MethodInfo: the listener goes where the provider declares a callback argument
    const service = welcome.services.find((info) => info.name === SERVICE);
    const method = service && service.methods.find((info) => info.name === 'addListener');
    if (!method || !(method.callbackArguments || []).includes(1)) {
      throw new Error(`${SERVICE}.addListener(key, listener) is not exported as expected`);
    }
    // §8 Callbacks: the consumer numbers its callback instances; this one is id 1
    const listener = new PrintingListener(wanted);
    const ref = consumer.exportListener(listener, LISTENER);
    const added = await consumer.call('addListener', [str('foo.bar'), ref]);
    console.log(`addListener returned ${JSON.stringify(added)}`);
    await listener.enough;
    // §8 Removers: a remover argument names the instance by its existing id
    const removed = await consumer.call('removeListener', [str('foo.bar'), ref]);
    console.log(`removeListener returned ${JSON.stringify(removed)}`);
    consumer.done = true;
    stream.end(); // §10 The end of a stream: half-close; the provider ends the RPC
  }).catch((error) => consumer.fail(error.message));
}

// The listener, as the seed's anonymous CallbackListener: prints what the provider pushes.
class PrintingListener {
  constructor(wanted) {
    this.received = 0;
    this.enough = new Promise((resolve) => { this.reached = resolve; });
    this.wanted = wanted;
  }

  changed(msg) {
    this.received += 1;
    console.log(`callback ${this.received}: ${msg}`);
    if (this.received >= this.wanted) this.reached();
    return null;
  }
}

class Consumer {
  constructor(stream) {
    this.stream = stream;
    this.nextCallId = 1; // §6 Who numbers which ids: each side its own calls, from 1
    this.nextCallbackId = 1;
    this.outgoing = new Map(); // our call id -> {resolve, reject}
    this.listeners = new Map(); // callback id -> {object, methods}
    this.turns = new Map(); // callback id -> the promise its previous call ends with
    this.unanswered = new Set(); // ids of the provider's calls we owe a Result
    this.goingAway = false;
    this.done = false;
    this.welcome = new Promise((resolve) => { this.welcomed = resolve; });
  }

  receive(frame) {
    switch (frame.kind) {
      case 'batch': // §11 Batch: its frames in order, as if sent one by one; never nested
        for (const inner of frame.batch.frames) this.receive(inner);
        break;
      case 'welcome':
        this.welcomed(frame.welcome);
        break;
      case 'call':
        this.serve(frame.call);
        break;
      case 'result':
        this.settle(frame.result);
        break;
      case 'cancel': // §9 Cancel: over for both sides, no Result; an unknown id: ignored
        this.unanswered.delete(frame.cancel.id);
        break;
      case 'release': // §8 Release: the provider ended the instance; forget it
        console.log(`released callback ${frame.release.callbackId}`);
        this.listeners.delete(frame.release.callbackId);
        break;
      case 'goAway': // §10 GoAway: send no new calls on this stream
        console.log(`provider going away: ${frame.goAway.reason}`);
        this.goingAway = true;
        // nothing more to do here: end the stream, which ends the listener (a longer-lived
        // consumer would open a new stream and add its listener again)
        this.done = true;
        this.stream.end();
        break;
      case 'fault': // §13 Faults: our mistake, reported; the stream goes on
        console.log(`fault from the provider: ${frame.fault.message}`);
        break;
      default: // multicast: not negotiated (the Hello left accepts_multicast false)
        console.log(`unexpected ${frame.kind} frame`);
    }
  }

  exportListener(object, { name, methods }) {
    const id = String(this.nextCallbackId++);
    this.listeners.set(id, { object, methods });
    // §8 CallbackRef: interface is informational; the provider checks nothing by it
    return { callbackValue: { id, interface: name } };
  }

  call(method, args) {
    if (this.goingAway) return Promise.reject(new Error('the provider is going away'));
    const id = String(this.nextCallId++);
    this.stream.write({ call: { id, service: SERVICE, method, args } });
    return new Promise((resolve, reject) => this.outgoing.set(id, { resolve, reject }));
  }

  settle(result) {
    const waiter = this.outgoing.get(result.id);
    if (!waiter) return; // §9 Cancel: a Result that crossed our Cancel is dropped
    this.outgoing.delete(result.id);
    if (result.outcome === 'error') {
      const { code, type, message } = result.error; // §15 Errors: the code and the type name
      waiter.reject(new Error(`${code} ${type}: ${message}`));
    } else {
      waiter.resolve(fromValue(result.value));
    }
  }

  serve(call) {
    // §7 Ordering: calls to one instance run one at a time, in arrival order. A call
    // nested in the one running on its instance would have to run at once instead, but
    // there are none here: this consumer never calls the provider from a listener
    const callbackId = call.callbackId;
    if (!call.oneWay) this.unanswered.add(call.id);
    const previous = this.turns.get(callbackId) || Promise.resolve();
    const next = previous.then(() => this.run(call));
    this.turns.set(callbackId, next);
    next.then(() => {
      if (this.turns.get(callbackId) === next) this.turns.delete(callbackId);
    });
  }

  async run(call) {
    if (!call.oneWay && !this.unanswered.has(call.id)) return; // §9: cancelled while queued
    const outcome = await this.outcome(call);
    if (call.oneWay) return; // §6 Result: a one-way call gets no Result
    if (!this.unanswered.delete(call.id)) return; // §9 Cancel: no Result after a Cancel
    this.stream.write({ result: { id: call.id, ...outcome } });
  }

  // What a call to a listener comes to: a Result's value, or its error (§15 Errors)
  async outcome(call) {
    const listener = this.listeners.get(call.callbackId);
    if (!call.callbackId) {
      return failure('NOT_FOUND', 'backchannel.ServiceNotFound', 'a consumer exports no services');
    }
    if (!listener) { // how a listener answers "gone"
      return failure('NOT_FOUND', 'backchannel.CallbackGone',
        `callback ${call.callbackId} is not exported on this stream`);
    }
    if (!listener.methods.has(call.method)) {
      return failure('UNIMPLEMENTED', 'backchannel.MethodNotFound',
        `callback ${call.callbackId} has no method '${call.method}'`);
    }
    let args;
    try {
      args = (call.args || []).map(fromValue);
    } catch (error) {
      return failure('INVALID_ARGUMENT', 'backchannel.DecodeError', error.message);
    }
    let value;
    try {
      value = await listener.object[call.method](...args);
    } catch (error) { // an application error: its own type name, code UNKNOWN
      return failure('UNKNOWN', error.name || 'Error', String(error.message));
    }
    try {
      return { value: toValue(value) };
    } catch (error) {
      return failure('INTERNAL', 'backchannel.EncodeError', error.message);
    }
  }

  fail(why) {
    console.error(`failed: ${why}`);
    process.exit(1);
  }
}

function failure(code, type, message) {
  return { error: { code, type, message } };
}

function str(text) {
  return { stringValue: text };
}

// §16 Values: the Value kinds this example needs, both ways (ints stay decimal strings)
function fromValue(value) {
  switch (value.kind) {
    case 'nullValue': return null;
    case 'boolValue': return value.boolValue;
    case 'intValue': return value.intValue; // a string: exact over the whole int64 range
    case 'doubleValue': return value.doubleValue;
    case 'stringValue': return value.stringValue;
    case 'bytesValue': return value.bytesValue;
    case 'listValue': return (value.listValue.items || []).map(fromValue);
    case 'mapValue': // §16 Values: a map's key order is not kept
      return Object.fromEntries(
        Object.entries(value.mapValue.entries || {}).map(([k, v]) => [k, fromValue(v)]));
    default: throw new Error(`unsupported value kind ${value.kind}`);
  }
}

function toValue(value) {
  if (value === null || value === undefined) return { nullValue: 'NULL_VALUE' };
  if (typeof value === 'string') return { stringValue: value };
  if (typeof value === 'boolean') return { boolValue: value };
  if (typeof value === 'number') {
    return Number.isSafeInteger(value) ? { intValue: String(value) } : { doubleValue: value };
  }
  if (Array.isArray(value)) return { listValue: { items: value.map(toValue) } };
  throw new Error(`cannot send a ${typeof value}`);
}

main();
