package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"cloud.google.com/go/longrunning/autogen/longrunningpb"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	adminpb "tvixfarm/proto/tvixfarm/admin/v1"
)

// clusterFlags are the flags every cluster command takes.
type clusterFlags struct {
	fs      *flag.FlagSet
	farm    *string
	timeout *time.Duration
	json    *bool
}

func newClusterFlags(name string) *clusterFlags {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	return &clusterFlags{
		fs:      fs,
		farm:    fs.String("farm", "127.0.0.1:8980", "address of any scheduler node (host:port)"),
		timeout: fs.Duration("timeout", 10*time.Second, "deadline of the call"),
		json:    fs.Bool("json", false, "print JSON for scripts"),
	}
}

// dial parses args and connects; the positional arguments remain in
// c.fs.Args().
func (c *clusterFlags) dial(args []string) (*grpc.ClientConn, context.Context, context.CancelFunc, error) {
	// Flags may follow positional arguments (farmctl drain w1 --farm X).
	var pos []string
	for len(args) > 0 {
		if err := c.fs.Parse(args); err != nil {
			return nil, nil, nil, err
		}
		args = c.fs.Args()
		if len(args) > 0 {
			pos = append(pos, args[0])
			args = args[1:]
		}
	}
	c.fs.Parse(append([]string{"--"}, pos...))
	conn, err := grpc.NewClient(*c.farm, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, nil, nil, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), *c.timeout)
	return conn, ctx, cancel, nil
}

// printJSON prints a message as JSON.
func printJSON(w io.Writer, m proto.Message) error {
	b, err := protojson.MarshalOptions{Multiline: true, EmitUnpopulated: true}.Marshal(m)
	if err != nil {
		return err
	}
	_, err = fmt.Fprintln(w, string(b))
	return err
}

// printCluster prints a cluster status as tables.
func printCluster(w io.Writer, st *adminpb.ClusterStatus) error {
	fmt.Fprintf(w, "leader   %s\nterm     %d\nqueue   ", st.Leader, st.Term)
	if len(st.Queue) == 0 {
		fmt.Fprint(w, " empty")
	}
	for _, q := range st.Queue {
		fmt.Fprintf(w, " priority %d: %d", q.Priority, q.Queued)
	}
	fmt.Fprintf(w, "\nexecuting %d, completed (retained) %d\n\n", st.Executing, st.Completed)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "member\traft\tclient\trole\n")
	for _, m := range st.Members {
		role := "follower"
		switch {
		case m.Leader:
			role = "leader"
		case !m.Voter:
			role = "non-voter"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", m.Id, m.Raft, m.Client, role)
	}
	tw.Flush()
	fmt.Fprintln(w)
	return printWorkers(w, st.Workers)
}

func printWorkers(w io.Writer, ws []*adminpb.WorkerInfo) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "worker\tbusy\tstate\tplatform\n")
	for _, wk := range ws {
		state := "active"
		if wk.Drained {
			state = "drained"
		}
		fmt.Fprintf(tw, "%s\t%d/%d\t%s\t%s\n", wk.Id, wk.Running, wk.Slots, state, strings.Join(wk.Platform, " "))
	}
	if len(ws) == 0 {
		fmt.Fprintf(tw, "(none)\t\t\t\n")
	}
	return tw.Flush()
}

// workersCmd lists the workers.
func workersCmd(args []string) error {
	c := newClusterFlags("workers")
	conn, ctx, cancel, err := c.dial(args)
	if err != nil {
		return err
	}
	defer conn.Close()
	defer cancel()
	st, err := adminpb.NewClusterClient(conn).Status(ctx, &adminpb.ClusterStatusRequest{})
	if err != nil {
		return fmt.Errorf("workers of %s: %w", *c.farm, err)
	}
	if *c.json {
		return printJSON(os.Stdout, &adminpb.ClusterStatus{Workers: st.Workers})
	}
	return printWorkers(os.Stdout, st.Workers)
}

// opsCmd lists operations.
func opsCmd(args []string) error {
	c := newClusterFlags("ops")
	state := c.fs.String("state", "", "only operations in this state: queued, executing or completed")
	conn, ctx, cancel, err := c.dial(args)
	if err != nil {
		return err
	}
	defer conn.Close()
	defer cancel()
	req := &longrunningpb.ListOperationsRequest{}
	if *state != "" {
		req.Filter = "stage=" + *state
	}
	var ops []*longrunningpb.Operation
	for {
		resp, err := longrunningpb.NewOperationsClient(conn).ListOperations(ctx, req)
		if err != nil {
			return fmt.Errorf("operations of %s: %w", *c.farm, err)
		}
		ops = append(ops, resp.Operations...)
		if resp.NextPageToken == "" {
			break
		}
		req.PageToken = resp.NextPageToken
	}
	if *c.json {
		return printJSON(os.Stdout, &longrunningpb.ListOperationsResponse{Operations: ops})
	}
	tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "operation\tstage\taction\tresult\n")
	for _, op := range ops {
		var md repb.ExecuteOperationMetadata
		op.Metadata.UnmarshalTo(&md)
		result := ""
		if op.Done {
			var r repb.ExecuteResponse
			if op.GetResponse().UnmarshalTo(&r) == nil {
				switch {
				case r.Status.GetCode() != 0:
					result = fmt.Sprintf("error %d: %s", r.Status.GetCode(), r.Status.GetMessage())
				case r.Result != nil:
					result = fmt.Sprintf("exit %d", r.Result.ExitCode)
				}
			}
		}
		fmt.Fprintf(tw, "%s\t%s\t%s/%d\t%s\n", op.Name, strings.ToLower(md.Stage.String()), md.ActionDigest.GetHash(), md.ActionDigest.GetSizeBytes(), result)
	}
	return tw.Flush()
}

// cancelCmd cancels an operation.
func cancelCmd(args []string) error {
	c := newClusterFlags("cancel")
	conn, ctx, cancel, err := c.dial(args)
	if err != nil {
		return err
	}
	defer conn.Close()
	defer cancel()
	if c.fs.NArg() != 1 {
		return fmt.Errorf("usage: farmctl cancel OPERATION")
	}
	if _, err := longrunningpb.NewOperationsClient(conn).CancelOperation(ctx, &longrunningpb.CancelOperationRequest{Name: c.fs.Arg(0)}); err != nil {
		return fmt.Errorf("cancel %s: %w", c.fs.Arg(0), err)
	}
	fmt.Printf("cancelled %s\n", c.fs.Arg(0))
	return nil
}

// drainCmd drains or undrains a worker.
func drainCmd(args []string, drained bool) error {
	name := map[bool]string{true: "drain", false: "undrain"}[drained]
	c := newClusterFlags(name)
	conn, ctx, cancel, err := c.dial(args)
	if err != nil {
		return err
	}
	defer conn.Close()
	defer cancel()
	if c.fs.NArg() != 1 {
		return fmt.Errorf("usage: farmctl %s WORKER", name)
	}
	if _, err := adminpb.NewClusterClient(conn).Drain(ctx, &adminpb.DrainRequest{Worker: c.fs.Arg(0), Drained: drained}); err != nil {
		return fmt.Errorf("%s %s: %w", name, c.fs.Arg(0), err)
	}
	fmt.Printf("%sed %s\n", name, c.fs.Arg(0))
	return nil
}

// membersCmd lists, adds or removes scheduler nodes.
func membersCmd(args []string) error { return runMembers(args, os.Stdout) }

// runMembers is membersCmd printing to w. A node to add must be running
// with raft on RAFT_ADDR (and bootstrap: false); the leader checks that
// it answers there as NODE before it changes the configuration.
func runMembers(args []string, w io.Writer) error {
	c := newClusterFlags("members")
	conn, ctx, cancel, err := c.dial(args)
	if err != nil {
		return err
	}
	defer conn.Close()
	defer cancel()
	cl := adminpb.NewClusterClient(conn)
	var st *adminpb.ClusterStatus
	switch {
	case c.fs.NArg() == 3 && c.fs.Arg(0) == "add":
		st, err = cl.AddMember(ctx, &adminpb.AddMemberRequest{Id: c.fs.Arg(1), Raft: c.fs.Arg(2)})
	case c.fs.NArg() == 2 && c.fs.Arg(0) == "remove":
		st, err = cl.RemoveMember(ctx, &adminpb.RemoveMemberRequest{Id: c.fs.Arg(1)})
	case c.fs.NArg() == 0 || c.fs.NArg() == 1 && c.fs.Arg(0) == "list":
		st, err = cl.Status(ctx, &adminpb.ClusterStatusRequest{})
	default:
		return fmt.Errorf("usage: farmctl members [list | add NODE RAFT_ADDR | remove NODE]")
	}
	if err != nil {
		return fmt.Errorf("members: %w", err)
	}
	if *c.json {
		return printJSON(w, &adminpb.ClusterStatus{Leader: st.Leader, Term: st.Term, Members: st.Members})
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "member\traft\tclient\tleader\n")
	for _, m := range st.Members {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%v\n", m.Id, m.Raft, m.Client, m.Leader)
	}
	return tw.Flush()
}
