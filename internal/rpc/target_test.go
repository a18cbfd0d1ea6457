package rpc

import (
	"context"
	"net"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
)

// TestTargetList: a channel over a list of addresses reaches a live one
// when the first is dead, and moves on when the one it uses dies.
func TestTargetList(t *testing.T) {
	serve := func() (string, func()) {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		s := grpc.NewServer()
		healthpb.RegisterHealthServer(s, health.NewServer())
		go s.Serve(l)
		return l.Addr().String(), s.Stop
	}
	dead, stop := serve()
	stop()
	a, stopA := serve()
	b, stopB := serve()
	defer stopB()
	target, opts, err := Target(dead + ", " + a + "," + b)
	if err != nil {
		t.Fatal(err)
	}
	conn, err := grpc.NewClient(target, append(opts, grpc.WithTransportCredentials(insecure.NewCredentials()))...)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	// A call on a connection as it closes fails with UNAVAILABLE; callers
	// retry such calls, and so does this check, until the channel has
	// moved on or 10 s have passed.
	check := func(what string) {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		for {
			_, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{}, grpc.WaitForReady(true))
			if err == nil {
				return
			}
			if status.Code(err) != codes.Unavailable || ctx.Err() != nil {
				t.Fatalf("%s: %v", what, err)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	check("first address dead")
	stopA()
	check("the address in use died")

	if tg, opts, err := Target("dns:///sched:8980"); err != nil || tg != "dns:///sched:8980" || opts != nil {
		t.Errorf("one target: %q, %d options, %v", tg, len(opts), err)
	}
	for _, bad := range []string{"a:1,b", "a:1,,b:2", "a:1, "} {
		if _, _, err := Target(bad); err == nil {
			t.Errorf("Target(%q) accepted", bad)
		}
	}
}
