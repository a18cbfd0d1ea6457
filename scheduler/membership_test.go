package scheduler_test

import (
	"context"
	"slices"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	adminpb "tvixfarm/proto/tvixfarm/admin/v1"
)

func memberIDs(st *adminpb.ClusterStatus) []string {
	var ids []string
	for _, m := range st.GetMembers() {
		ids = append(ids, m.Id)
	}
	slices.Sort(ids)
	return ids
}

// TestMembership grows a one-node cluster to three with the Cluster
// service's AddMember (what farmctl members add calls), over real raft
// TCP transports; the new nodes replicate what the cluster did before
// and after. Then it removes a follower, and the leader itself, with
// RemoveMember: the cluster carries on each time.
func TestMembership(t *testing.T) {
	c := emptyCluster(t)
	c.add("node1", bootSolo)
	c.add("node2", bootJoin)
	c.add("node3", bootJoin)
	c.start("node1")
	c.waitLeaderAmong("node1")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	r := &runner{delay: time.Millisecond, slots: 8, runs: map[string]int{}}
	stopWorker := startWorker(c.connTo("node1", "node2"), "w", r)
	defer func() { stopWorker() }()
	before := c.run(ctx, c.nodeConn("node1"), 0, 10)

	// The joining nodes wait, without a leader, until they are added.
	c.start("node2")
	c.start("node3")
	admin := adminpb.NewClusterClient(c.nodeConn("node1"))
	// Mistakes are refused before they change the configuration: the
	// gRPC port instead of raft's, another node's raft address, nothing
	// listening.
	for _, bad := range []*adminpb.AddMemberRequest{
		{Id: "node2", Raft: c.client["node2"]},
		{Id: "node3", Raft: c.raft["node2"]},
		{Id: "node4", Raft: freeAddr(t)},
		{Id: "", Raft: c.raft["node2"]},
	} {
		start := time.Now()
		_, err := admin.AddMember(ctx, bad)
		if code := status.Code(err); code != codes.FailedPrecondition && code != codes.InvalidArgument {
			t.Errorf("AddMember %v: %v", bad, err)
		}
		t.Logf("AddMember %s %s refused in %v: %v", bad.Id, bad.Raft, time.Since(start).Round(time.Millisecond), status.Convert(err).Message())
	}
	if st, err := admin.Status(ctx, &adminpb.ClusterStatusRequest{}); err != nil || !slices.Equal(memberIDs(st), []string{"node1"}) {
		t.Fatalf("after refused adds: %v %v", memberIDs(st), err)
	}

	start := time.Now()
	st, err := admin.AddMember(ctx, &adminpb.AddMemberRequest{Id: "node2", Raft: c.raft["node2"]})
	if err != nil || !slices.Equal(memberIDs(st), []string{"node1", "node2"}) {
		t.Fatalf("add node2: %v %v", memberIDs(st), err)
	}
	added2 := time.Since(start)
	// node2 forwards to the leader: node3 is added through it.
	c.waitLeaderAmong("node1", "node2")
	start = time.Now()
	st, err = adminpb.NewClusterClient(c.nodeConn("node2")).AddMember(ctx, &adminpb.AddMemberRequest{Id: "node3", Raft: c.raft["node3"]})
	if err != nil || !slices.Equal(memberIDs(st), []string{"node1", "node2", "node3"}) {
		t.Fatalf("add node3: %v %v", memberIDs(st), err)
	}
	added3 := time.Since(start)
	c.waitLeaderAmong("node1", "node2", "node3")
	// Adding a member again changes nothing.
	if st, err := admin.AddMember(ctx, &adminpb.AddMemberRequest{Id: "node3", Raft: c.raft["node3"]}); err != nil || len(st.Members) != 3 {
		t.Fatalf("add node3 again: %v %v", memberIDs(st), err)
	}
	// They replicate what was done before they joined, and after.
	after := c.run(ctx, c.nodeConn("node3"), 100, 10)
	for _, id := range []string{"node2", "node3"} {
		waitFor(t, 10*time.Second, id+" catching up", func() bool { return c.caughtUp(id, "node1") })
		c.checkCompleted(id, before)
		c.checkCompleted(id, after)
	}

	// Remove a follower: two members go on. The removed node, still
	// running, hears from no leader any more; its pre-votes are refused,
	// so it does not disturb the others.
	term := c.nodes["node1"].n.Stats().Term
	st, err = admin.RemoveMember(ctx, &adminpb.RemoveMemberRequest{Id: "node3"})
	if err != nil || !slices.Equal(memberIDs(st), []string{"node1", "node2"}) {
		t.Fatalf("remove node3: %v %v", memberIDs(st), err)
	}
	if _, err := admin.RemoveMember(ctx, &adminpb.RemoveMemberRequest{Id: "node3"}); status.Code(err) != codes.NotFound {
		t.Fatalf("remove node3 again: %v", err)
	}
	afterRemove := c.run(ctx, c.nodeConn("node2"), 200, 10)
	waitFor(t, 10*time.Second, "node2 catching up", func() bool { return c.caughtUp("node2", "node1") })
	c.checkCompleted("node2", afterRemove)
	time.Sleep(2 * time.Second) // a few election timeouts
	if st := c.nodes["node1"].n.Stats(); st.Leader != "node1" || st.Term != term {
		t.Errorf("after removing node3: leader %s term %d, was node1 term %d", st.Leader, st.Term, term)
	}
	if id, _ := c.nodes["node3"].n.Leader(); id != "" || c.nodes["node3"].n.IsLeader() {
		t.Errorf("the removed node3 sees leader %q", id)
	}
	c.stop("node3")

	// Remove the leader itself: it steps down once the change commits,
	// node2 leads alone, and forgets node1's client address.
	start = time.Now()
	if _, err := admin.RemoveMember(ctx, &adminpb.RemoveMemberRequest{Id: "node1"}); err != nil {
		t.Fatalf("remove node1: %v", err)
	}
	c.stop("node1") // the worker moves to node2
	c.waitLeaderAmong("node2")
	failover := time.Since(start)
	admin2 := adminpb.NewClusterClient(c.nodeConn("node2"))
	waitFor(t, 10*time.Second, "node1's address forgotten", func() bool {
		st, err := admin2.Status(ctx, &adminpb.ClusterStatusRequest{})
		return err == nil && slices.Equal(memberIDs(st), []string{"node2"}) && st.Members[0].Client == c.client["node2"] && st.Leader == "node2"
	})
	last := c.run(ctx, c.nodeConn("node2"), 300, 10)
	c.checkCompleted("node2", append(append(before, after...), last...))
	t.Logf("node2 added in %v, node3 in %v; after removing the leader, node2 led within %v",
		added2.Round(time.Millisecond), added3.Round(time.Millisecond), failover.Round(time.Millisecond))
}
