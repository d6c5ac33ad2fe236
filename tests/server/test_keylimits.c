/*
 * test_keylimits.c - the per-client limits and figures (server/keylimits.c): concurrency, the token
 * bucket and its Retry-After (debt paid off by the refill, never more than a minute's tokens saved),
 * clients of users of a shared key, the bound on remembered users, and labels that never show a key.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "keylimits.h"
#include "test.h"

#define SEC 1000000000ull

TEST(concurrency_per_client) {
    srv_keys k;
    srv_keys_init(&k);
    srv_keys_add(&k, "sk-alpha");
    srv_keys_add(&k, "sk-beta");
    srv_keylimits *kl = srv_keylimits_create(&k, 2, 0);
    ASSERT_TRUE(kl);
    int a = srv_keylimits_client(kl, 0, NULL, 0), b = srv_keylimits_client(kl, 1, NULL, 0), ra = -1;
    ASSERT_TRUE(a != b);
    ASSERT_EQ_INT(srv_keylimits_begin(kl, a, 0, &ra), SRV_LIMIT_OK);
    ASSERT_EQ_INT(srv_keylimits_begin(kl, a, 0, &ra), SRV_LIMIT_OK);
    ASSERT_EQ_INT(srv_keylimits_begin(kl, a, 0, &ra), SRV_LIMIT_CONCURRENCY);
    ASSERT_EQ_INT(ra, 1);
    ASSERT_EQ_INT(srv_keylimits_begin(kl, b, 0, &ra), SRV_LIMIT_OK); /* another key is not held back */
    srv_keylimits_end(kl, a);
    ASSERT_EQ_INT(srv_keylimits_begin(kl, a, 0, &ra), SRV_LIMIT_OK);
    srv_keylimits_preempted(kl, b, 2);
    srv_keylimits_preempted(kl, b, 1);
    srv_buf out;
    srv_buf_init(&out, 0);
    srv_keylimits_render(kl, 0, &out);
    ASSERT_TRUE(out.data && !out.failed);
    /* preemptions per key: 3 for b, 0 for a */
    int pre[2] = {0, 0}, n_pre = 0;
    for (const char *l = strstr(out.data, "\ncodemoe_key_preemptions_total{key=\"k-"); l && n_pre < 2;
         l = strstr(l + 1, "\ncodemoe_key_preemptions_total{key=\"k-"))
        pre[n_pre++] = atoi(strchr(l, '}') + 2);
    ASSERT_EQ_INT(n_pre, 2);
    ASSERT_EQ_INT(pre[0] + pre[1], 3);
    ASSERT_EQ_INT(pre[0] * pre[1], 0);
    ASSERT_TRUE(strstr(out.data, "codemoe_key_rejected_total{key=\"k-") != NULL);
    ASSERT_TRUE(strstr(out.data, ",reason=\"concurrency\"} 1\n") != NULL);
    ASSERT_TRUE(strstr(out.data, "codemoe_key_requests_in_flight{key=\"k-") != NULL);
    ASSERT_TRUE(strstr(out.data, "alpha") == NULL && strstr(out.data, "beta") == NULL); /* never the key */
    ASSERT_TRUE(strstr(out.data, "codemoe_key_token_bucket") == NULL); /* no tokens limit, no bucket */
    srv_buf_free(&out);
    srv_keylimits_free(kl);
    srv_keys_free(&k);
}

/* 600 tokens per minute: 10 per second. A request is let in while the bucket is above zero; its use
 * can take it below; Retry-After is the wait until it is above zero again. */
TEST(token_bucket_and_retry_after) {
    srv_keys k;
    srv_keys_init(&k);
    srv_keylimits *kl = srv_keylimits_create(&k, 0, 600);
    int c = srv_keylimits_client(kl, SRV_KEY_OPEN, NULL, 0), ra = -1;
    ASSERT_EQ_INT(srv_keylimits_begin(kl, c, 0, &ra), SRV_LIMIT_OK);
    ASSERT_EQ_INT(ra, 0);
    srv_keylimits_charge(kl, c, 700, 0);
    srv_keylimits_end(kl, c);
    ASSERT_NEAR(srv_keylimits_bucket(kl, c, 0), -100, 1e-6);
    ASSERT_EQ_INT(srv_keylimits_begin(kl, c, 0, &ra), SRV_LIMIT_TOKENS);
    ASSERT_EQ_INT(ra, 10);
    ASSERT_EQ_INT(srv_keylimits_begin(kl, c, 5 * SEC + SEC / 2, &ra), SRV_LIMIT_TOKENS);
    ASSERT_EQ_INT(ra, 5); /* 45 tokens owed: 4.5 s, rounded up */
    ASSERT_EQ_INT(srv_keylimits_begin(kl, c, 10 * SEC + 1, &ra), SRV_LIMIT_OK);
    srv_keylimits_end(kl, c);
    /* an hour idle saves a minute's tokens, no more */
    ASSERT_NEAR(srv_keylimits_bucket(kl, c, 3600 * SEC), 600, 1e-6);
    srv_buf out;
    srv_buf_init(&out, 0);
    srv_keylimits_render(kl, 3600 * SEC, &out);
    ASSERT_TRUE(out.data && strstr(out.data, "codemoe_key_token_bucket{key=\"open\",user=\"\"} 600\n"));
    ASSERT_TRUE(strstr(out.data, "codemoe_key_rejected_total{key=\"open\",user=\"\",reason=\"tokens\"} 2\n"));
    ASSERT_TRUE(strstr(out.data, "codemoe_key_tokens_total{key=\"open\",user=\"\"} 700\n"));
    ASSERT_TRUE(strstr(out.data, "codemoe_key_requests_total{key=\"open\",user=\"\"} 2\n"));
    srv_buf_free(&out);
    srv_keylimits_free(kl);
}

TEST(user_names) {
    ASSERT_TRUE(srv_user_name_ok("alice"));
    ASSERT_TRUE(srv_user_name_ok("a.b_c@d:e+f=g-h"));
    ASSERT_TRUE(!srv_user_name_ok(""));
    ASSERT_TRUE(!srv_user_name_ok(NULL));
    ASSERT_TRUE(!srv_user_name_ok("a b"));
    ASSERT_TRUE(!srv_user_name_ok("a\"b"));
    ASSERT_TRUE(!srv_user_name_ok("a\\b"));
    char longname[66];
    memset(longname, 'x', 65);
    longname[65] = 0;
    ASSERT_TRUE(!srv_user_name_ok(longname));
    longname[64] = 0;
    ASSERT_TRUE(srv_user_name_ok(longname));
}

/* Users of a shared key are clients of their own (fair ids and limits), also across keys; once
 * SRV_KEYLIMITS_MAX_USERS are busy a new user counts as its key, and an idle one makes room. */
TEST(users_of_a_shared_key) {
    srv_keys k;
    srv_keys_init(&k);
    srv_keys_add(&k, "sk-team");
    srv_keys_add(&k, "sk-other");
    srv_keylimits *kl = srv_keylimits_create(&k, 1, 0);
    int key = srv_keylimits_client(kl, 0, NULL, 0);
    int alice = srv_keylimits_client(kl, 0, "alice", 0), bob = srv_keylimits_client(kl, 0, "bob", 0);
    int alice2 = srv_keylimits_client(kl, 1, "alice", 0);
    ASSERT_TRUE(alice != key && bob != key && alice != bob && alice2 != alice);
    ASSERT_EQ_INT(srv_keylimits_client(kl, 0, "alice", 0), alice);
    ASSERT_EQ_INT(srv_keylimits_client(kl, 0, "", 0), key);
    ASSERT_TRUE(srv_keylimits_fair_id(kl, alice) != srv_keylimits_fair_id(kl, bob));
    ASSERT_TRUE(srv_keylimits_fair_id(kl, alice) != srv_keylimits_fair_id(kl, key));
    int ra;
    ASSERT_EQ_INT(srv_keylimits_begin(kl, alice, 0, &ra), SRV_LIMIT_OK);
    ASSERT_EQ_INT(srv_keylimits_begin(kl, alice, 0, &ra), SRV_LIMIT_CONCURRENCY);
    ASSERT_EQ_INT(srv_keylimits_begin(kl, bob, 0, &ra), SRV_LIMIT_OK);
    srv_keylimits_end(kl, bob);
    ASSERT_EQ_INT(srv_keylimits_begin(kl, alice2, 0, &ra), SRV_LIMIT_OK);
    /* fill the table with busy users: all but bob are */
    char name[32];
    for (int i = 3; i < SRV_KEYLIMITS_MAX_USERS; i++) {
        snprintf(name, sizeof name, "u%d", i);
        int c = srv_keylimits_client(kl, 1, name, 0);
        ASSERT_TRUE(c != srv_keylimits_client(kl, 1, NULL, 0));
        ASSERT_EQ_INT(srv_keylimits_begin(kl, c, 0, &ra), SRV_LIMIT_OK);
    }
    /* full: bob is idle and is forgotten for carol; then dave counts as the key */
    int carol = srv_keylimits_client(kl, 0, "carol", 0);
    ASSERT_TRUE(carol != key);
    ASSERT_EQ_INT(srv_keylimits_begin(kl, carol, 0, &ra), SRV_LIMIT_OK);
    ASSERT_EQ_INT(srv_keylimits_client(kl, 0, "dave", 0), key);
    ASSERT_EQ_INT(srv_keylimits_client(kl, 0, "alice", 0), alice); /* busy users are kept */
    srv_buf out;
    srv_buf_init(&out, 0);
    srv_keylimits_render(kl, 0, &out);
    ASSERT_TRUE(out.data && strstr(out.data, ",user=\"alice\"} 1\n"));
    ASSERT_TRUE(strstr(out.data, "user=\"bob\"") == NULL);
    ASSERT_TRUE(strstr(out.data, "sk-") == NULL);
    srv_buf_free(&out);
    srv_keylimits_free(kl);
    srv_keys_free(&k);
}

int main(void) {
    RUN(concurrency_per_client);
    RUN(token_bucket_and_retry_after);
    RUN(user_names);
    RUN(users_of_a_shared_key);
    return test_summary();
}
