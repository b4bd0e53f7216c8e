// Command smq-go-check drives an SMQ server the way the original SMQ's Go client does
// (grpc-go, its dial options, timeouts and call patterns) and checks every answer.
//
// It is written for SMQ's interoperability test (tests/e2e/test_go_client.py); the
// original client's code is not copied here. The stubs come from proto/smq.proto,
// generated under the original's Go import path when the test builds this program.
//
// Usage: smq-go-check -addr HOST:PORT [-ca F -cert F -key F -server-name N] [-topic T] SCENARIO
// Scenarios: basic, streams, errors, abandoned, batch. Each prints "ok <check>" lines
// and exits 0, or prints "FAIL <check>: <why>" and exits 1.
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	pb "github.com/Suhaibinator/SuhaibMessageQueue/proto"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"
)

const heartbeatOffset = -1 // StreamConsume's keep-alive message, skipped as the Go client does

// The original client's per-call budgets: 100 s for produce and consume, 1 s for admin.
const (
	callTimeout  = 100 * time.Second
	adminTimeout = time.Second
)

type checker struct {
	rpc pb.SuhaibMessageQueueClient
}

func fail(check string, format string, args ...any) {
	fmt.Printf("FAIL %s: %s\n", check, fmt.Sprintf(format, args...))
	os.Exit(1)
}

func ok(check string) { fmt.Printf("ok %s\n", check) }

func must(check string, err error) {
	if err != nil {
		fail(check, "%v", err)
	}
}

func ctx(budget time.Duration) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), budget)
}

// dial opens a connection as the Go client does: 1 GiB message limits; plaintext, or
// TLS verified with ca (and a client certificate for mTLS).
func dial(addr, ca, cert, key, serverName string) (*grpc.ClientConn, error) {
	limits := grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(1<<30), grpc.MaxCallSendMsgSize(1<<30))
	if ca == "" { // grpc-go 1.33 (Debian 12) has WithInsecure, not credentials/insecure
		return grpc.Dial(addr, grpc.WithInsecure(), limits)
	}
	pool := x509.NewCertPool()
	pem, err := os.ReadFile(ca)
	if err != nil {
		return nil, err
	}
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("%s holds no certificate", ca)
	}
	config := &tls.Config{RootCAs: pool, ServerName: serverName}
	if cert != "" {
		pair, err := tls.LoadX509KeyPair(cert, key)
		if err != nil {
			return nil, err
		}
		config.Certificates = []tls.Certificate{pair}
	}
	return grpc.Dial(addr, grpc.WithTransportCredentials(credentials.NewTLS(config)), limits)
}

func (c *checker) createTopic(topic string) error {
	cx, cancel := ctx(adminTimeout)
	defer cancel()
	_, err := c.rpc.CreateTopic(cx, &pb.CreateTopicRequest{Topic: topic})
	return err
}

func (c *checker) produce(topic string, message []byte) (int64, error) {
	cx, cancel := ctx(callTimeout)
	defer cancel()
	reply, err := c.rpc.Produce(cx, &pb.ProduceRequest{Topic: topic, Message: message})
	if err != nil {
		return 0, err
	}
	return reply.Offset, nil
}

func (c *checker) consume(topic string, offset int64) ([]byte, int64, error) {
	cx, cancel := ctx(callTimeout)
	defer cancel()
	reply, err := c.rpc.Consume(cx, &pb.ConsumeRequest{Topic: topic, Offset: offset})
	if err != nil {
		return nil, -1, err
	}
	return reply.Message, reply.Offset, nil
}

func (c *checker) latest(topic string) (int64, error) {
	cx, cancel := ctx(callTimeout)
	defer cancel()
	reply, err := c.rpc.GetLatestOffset(cx, &pb.GetLatestOffsetRequest{Topic: topic})
	if err != nil {
		return 0, err
	}
	return reply.Offset, nil
}

func (c *checker) earliest(topic string) (int64, error) {
	cx, cancel := ctx(callTimeout)
	defer cancel()
	reply, err := c.rpc.GetEarliestOffset(cx, &pb.GetEarliestOffsetRequest{Topic: topic})
	if err != nil {
		return 0, err
	}
	return reply.Offset, nil
}

// streamProduce sends what next() returns until it errs, then half-closes and returns
// without reading the reply: the original client's StreamProduce.
func (c *checker) streamProduce(topic string, next func() ([]byte, error)) error {
	stream, err := c.rpc.StreamProduce(context.Background())
	if err != nil {
		return err
	}
	for {
		message, err := next()
		if err != nil {
			stream.CloseSend()
			return err
		}
		if err := stream.Send(&pb.ProduceRequest{Topic: topic, Message: message}); err != nil {
			return err
		}
	}
}

// streamConsume calls handle for each message from startOffset, skipping heartbeats;
// when handle errs it half-closes and returns, leaving the call open (as the original
// client does: its context is never cancelled).
func (c *checker) streamConsume(topic string, startOffset int64, handle func([]byte, int64) error) error {
	stream, err := c.rpc.StreamConsume(context.Background(), &pb.ConsumeRequest{Topic: topic, Offset: startOffset})
	if err != nil {
		return err
	}
	for {
		reply, err := stream.Recv()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		if reply.Offset == heartbeatOffset {
			continue
		}
		if err := handle(reply.Message, reply.Offset); err != nil {
			stream.CloseSend()
			return err
		}
	}
}

func payload(i int) []byte { return []byte(fmt.Sprintf(`{"go":%d}`, i)) }

var errEnough = errors.New("enough")

// basic: create (twice), produce, consume by offset, earliest, latest, bulk, trim.
func (c *checker) basic(topic string) {
	must("create topic", c.createTopic(topic))
	must("create topic again (idempotent)", c.createTopic(topic))
	for i := 1; i <= 100; i++ {
		offset, err := c.produce(topic, payload(i))
		must("produce", err)
		if offset != int64(i) {
			fail("produce", "message %d got offset %d", i, offset)
		}
	}
	ok("produce 100: offsets 1..100")
	message, offset, err := c.consume(topic, 42)
	must("consume", err)
	if offset != 42 || string(message) != string(payload(42)) {
		fail("consume", "offset 42 gave %q at %d", message, offset)
	}
	first, err := c.earliest(topic)
	must("earliest", err)
	last, err := c.latest(topic)
	must("latest", err)
	if first != 1 || last != 100 {
		fail("earliest/latest", "got %d..%d, want 1..100", first, last)
	}
	ok("consume, earliest, latest")
	cx, cancel := ctx(callTimeout)
	defer cancel()
	page, err := c.rpc.BulkRetrieve(cx, &pb.BulkRetrieveRequest{Topic: topic, StartOffset: 91, Limit: 50})
	must("bulk retrieve", err)
	if page.Count != 10 || len(page.Messages) != 10 || page.Messages[0].Offset != 91 || page.NextOffset != 101 {
		fail("bulk retrieve", "from 91: count %d, next %d", page.Count, page.NextOffset)
	}
	ok("bulk retrieve: the last page")
	dx, dcancel := ctx(adminTimeout)
	defer dcancel()
	_, err = c.rpc.DeleteUntilOffset(dx, &pb.DeleteUntilOffsetRequest{Topic: topic, Offset: 50})
	must("delete until offset", err)
	first, err = c.earliest(topic)
	must("earliest after trim", err)
	if first != 50 && first != 51 {
		fail("delete until offset", "earliest is %d after trimming until 50", first)
	}
	ok(fmt.Sprintf("delete until offset 50: earliest %d", first))
}

// streams: StreamProduce without reading the reply, then with it; StreamConsume from 0
// that stops after an offset, and one that follows live messages past heartbeats.
func (c *checker) streams(topic string) {
	must("create topic", c.createTopic(topic))
	sent := 0
	err := c.streamProduce(topic, func() ([]byte, error) {
		if sent == 1000 {
			return nil, io.EOF
		}
		sent++
		return payload(sent), nil
	})
	if err != io.EOF {
		fail("stream produce", "ended with %v", err)
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		last, err := c.latest(topic)
		if err == nil && last == 1000 {
			break
		}
		if time.Now().After(deadline) {
			fail("stream produce", "latest offset %d (%v) 20 s after half-close, want 1000", last, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
	ok("stream produce 1000 (reply never read): all appended")

	stream, err := c.rpc.StreamProduce(context.Background())
	must("stream produce with reply", err)
	for i := 1001; i <= 1010; i++ {
		must("stream produce send", stream.Send(&pb.ProduceRequest{Topic: topic, Message: payload(i)}))
	}
	reply, err := stream.CloseAndRecv()
	must("stream produce close", err)
	if reply.Offset != 1010 {
		fail("stream produce with reply", "last offset %d, want 1010", reply.Offset)
	}
	ok("stream produce 10 more, reply: offset 1010")

	var seen []int64
	err = c.streamConsume(topic, 0, func(message []byte, offset int64) error {
		if string(message) != string(payload(int(offset))) {
			return fmt.Errorf("offset %d holds %q", offset, message)
		}
		seen = append(seen, offset)
		if offset == 500 {
			return errEnough
		}
		return nil
	})
	if err != errEnough || len(seen) != 500 || seen[0] != 1 {
		fail("stream consume from 0", "err %v after %d messages", err, len(seen))
	}
	ok("stream consume from 0, stop after 500: 1..500 in order")

	live := make(chan error, 1)
	go func() {
		live <- c.streamConsume(topic, 1011, func(message []byte, offset int64) error {
			if offset != 1011 || string(message) != "live" {
				return fmt.Errorf("got %q at %d, want \"live\" at 1011", message, offset)
			}
			return errEnough
		})
	}()
	time.Sleep(1500 * time.Millisecond) // past a heartbeat or more, with nothing to send
	if _, err := c.produce(topic, []byte("live")); err != nil {
		fail("stream consume live", "produce: %v", err)
	}
	select {
	case err := <-live:
		if err != errEnough {
			fail("stream consume live", "%v", err)
		}
	case <-time.After(20 * time.Second):
		fail("stream consume live", "the live message never came")
	}
	ok("stream consume live: a message produced while waiting arrives")
}

// errors: the status codes a Go caller switches on.
func (c *checker) errors(topic string) {
	must("create topic", c.createTopic(topic))
	expect := func(check string, err error, code codes.Code, text string) {
		if status.Code(err) != code || !strings.Contains(status.Convert(err).Message(), text) {
			fail(check, "got %v, want %v containing %q", err, code, text)
		}
		ok(fmt.Sprintf("%s: %v", check, code))
	}
	_, err := c.earliest(topic)
	expect("earliest of an empty topic", err, codes.FailedPrecondition, "topic is empty")
	_, err = c.produce("no-such-topic", []byte("x"))
	expect("produce to a missing topic", err, codes.NotFound, "")
	_, err = c.produce(topic, []byte("one"))
	must("produce", err)
	_, _, err = c.consume(topic, 2)
	expect("consume past the end", err, codes.OutOfRange, "")
	_, _, err = c.consume(topic, 0)
	expect("consume offset 0", err, codes.NotFound, "")
	expect("create an invalid topic name", c.createTopic("bad name/with slash"), codes.InvalidArgument, "")
	err = c.streamConsume("no-such-topic", 0, func([]byte, int64) error { return nil })
	expect("stream consume a missing topic", err, codes.NotFound, "")
}

// abandoned: the original client leaves a StreamConsume open when its handler stops it.
// A long-lived program doing that again and again on one connection must keep working.
func (c *checker) abandoned(topic string, times int, pause time.Duration) {
	must("create topic", c.createTopic(topic))
	for i := 1; i <= 3; i++ {
		_, err := c.produce(topic, payload(i))
		must("produce", err)
	}
	for i := 0; i < times; i++ {
		time.Sleep(pause)
		done := make(chan error, 1)
		go func() {
			done <- c.streamConsume(topic, 1, func([]byte, int64) error { return errEnough })
		}()
		select {
		case err := <-done:
			if err != errEnough {
				fail("abandoned streams", "stream %d ended with %v", i+1, err)
			}
		case <-time.After(30 * time.Second):
			fail("abandoned streams", "stream %d got no message within 30 s", i+1)
		}
	}
	if _, err := c.produce(topic, []byte("still writable")); err != nil {
		fail("abandoned streams", "produce after %d abandoned streams: %v", times, err)
	}
	ok(fmt.Sprintf("%d streams left open on one connection, then produce and consume still work", times))
}

// batch: SMQ's batch RPCs from Go.
func (c *checker) batch(topic string) {
	must("create topic", c.createTopic(topic))
	messages := make([][]byte, 100)
	for i := range messages {
		messages[i] = payload(i + 1)
	}
	cx, cancel := ctx(callTimeout)
	defer cancel()
	reply, err := c.rpc.ProduceBatch(cx, &pb.ProduceBatchRequest{Topic: topic, Messages: messages})
	must("produce batch", err)
	if reply.FirstOffset != 1 || reply.LastOffset != 100 {
		fail("produce batch", "offsets %d..%d, want 1..100", reply.FirstOffset, reply.LastOffset)
	}
	sub, err := c.rpc.Subscribe(cx, &pb.SubscribeRequest{Topic: topic, Offset: 1})
	must("subscribe", err)
	next := int64(1)
	for next <= 100 {
		page, err := sub.Recv()
		must("subscribe", err)
		for _, m := range page.Messages {
			if m.Offset != next || string(m.Message) != string(payload(int(next))) {
				fail("subscribe", "got %q at %d, want offset %d", m.Message, m.Offset, next)
			}
			next++
		}
	}
	ok("produce batch of 100, subscribe reads them back")
}

func main() {
	addr := flag.String("addr", "127.0.0.1:8097", "server address")
	ca := flag.String("ca", "", "CA certificate (enables TLS)")
	cert := flag.String("cert", "", "client certificate")
	key := flag.String("key", "", "client key")
	serverName := flag.String("server-name", "localhost", "name the server certificate must hold")
	topic := flag.String("topic", "go-check", "topic to use (created)")
	connectTimeout := flag.Duration("connect-timeout", 10*time.Second, "how long to wait for Connect")
	times := flag.Int("times", 100, "abandoned: how many streams to leave open")
	pause := flag.Duration("pause", 0, "abandoned: wait this long before each stream")
	flag.Parse()
	conn, err := dial(*addr, *ca, *cert, *key, *serverName)
	must("dial", err)
	defer conn.Close()
	c := &checker{rpc: pb.NewSuhaibMessageQueueClient(conn)}
	cx, cancel := ctx(*connectTimeout)
	_, err = c.rpc.Connect(cx, &pb.ConnectRequest{}, grpc.WaitForReady(true))
	cancel()
	must("connect", err)
	ok("connect")
	switch flag.Arg(0) {
	case "basic":
		c.basic(*topic)
	case "streams":
		c.streams(*topic)
	case "errors":
		c.errors(*topic)
	case "abandoned":
		c.abandoned(*topic, *times, *pause)
	case "batch":
		c.batch(*topic)
	default:
		fail("usage", "unknown scenario %q", flag.Arg(0))
	}
}
